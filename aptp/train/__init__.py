"""Training loops: pruning and fine-tuning, and the trainings of the embedded toy model (``aptp.train.toy``)."""
