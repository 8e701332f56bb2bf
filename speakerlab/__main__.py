from speakerlab.cli import main

main()
