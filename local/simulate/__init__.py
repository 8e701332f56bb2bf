"""A simulated speaker-verification corpus in the 3D-Speaker layout: speakers with recognisable
voices talking several dialects, recorded by several devices at several distances, with MUSAN- and
RIRS_NOISES-like augmentation sets. ``local/simulate_mini_corpus.py`` is its command line.

Modules: ``voices`` (speakers and dialects), ``speech`` (source-filter synthesis), ``recording``
(room, distance and device), ``layout`` (ids, metadata files, trial lists), ``noise_sets``
(augmentation sets), ``corpus`` (the whole corpus, speakers in parallel).
"""
