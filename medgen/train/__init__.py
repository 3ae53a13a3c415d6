"""Training loops (accelerate) for both stages; shared machinery in `medgen.train.common`."""
