"""The embedded tiny base model's factory: search traces (:mod:`~tokenmdp.base.traces`), pretraining
(:mod:`~tokenmdp.base.pretrain`), its held-out measurement (:mod:`~tokenmdp.base.measure`) and where the model
lives, shipped or cached (:mod:`~tokenmdp.base.store`).

It sits above ``train/`` (it trains a model and evaluates it with the trainer's held-out evaluation); ``train/``
never builds a base model, it is handed a model path.
"""
