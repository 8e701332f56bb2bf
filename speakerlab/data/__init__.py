"""Data: Kaldi-style directories, the training index and the on-the-fly training pipeline."""
