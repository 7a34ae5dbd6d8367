"""A model definition as a user would have one: the small digits CNN, for the example."""

from grood.demo import DigitsNet


class TinyDigitsNet(DigitsNet):
    """The digits CNN of ``grood demo`` (6 classes, 8x8 grayscale inputs)."""

    def __init__(self) -> None:
        super().__init__(n_classes=6)
