"""SODA reference model package: data, item embeddings, RQ-VAE tokenizer, TIGER, baselines.

Run ``python -m soda --help``. The pieces, top to bottom: ``soda.data`` (datasets and the
leave-one-out split), ``soda.embeddings`` (offline sentence encoder), ``soda.tokenizer``
(RQ-VAE semantic IDs), ``soda.recommender`` (TIGER with trie-constrained beam search),
``soda.alignment`` (joint tokenizer + recommender training, SODA's term), ``soda.letter`` and
``soda.etegrec`` (the other backbones), ``soda.baselines`` (MostPop, SASRec), ``soda.metrics``,
``soda.train`` (the training loop), ``soda.recipes`` (the runs and presets), ``soda.experiment``
(the resumable reproduction experiment and its tables); helpers ``soda.atomic`` (atomic file
writes), ``soda.extras`` (the optional packages, located before a run writes anything),
``soda.progress`` (progress bars or log lines) and ``soda.distributed`` (torchrun).
"""
