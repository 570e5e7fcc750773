"""Real models and real data, all shipped inside installed packages (nothing is downloaded).

Models: ``mobilenet_v2`` (ImageNet), ``minilm`` (all-MiniLM-L6-v2 sentence encoder), and two small
CNNs trained on first use and cached, ``digits_cnn`` and ``mnist1d_cnn``. Data: ``photos``,
``digits``, ``mnist1d``, ``sentences``.

Example:
    >>> from netpress import zoo
    >>> zoo.default_data("digits_cnn")
    'digits'
    >>> model = zoo.load_model("digits_cnn")  # trained on first use (seconds), then cached
    >>> bundle = zoo.load_data("digits")
    >>> bundle.evaluation[0].run(model).shape
    torch.Size([32, 10])
"""

from netpress.zoo.data import DataBundle, data_names, default_data, load_data
from netpress.zoo.models import (
    MiniLMEncoder,
    build_architecture,
    load_model,
    model_names,
    tokenizer,
)

__all__ = [
    "DataBundle",
    "MiniLMEncoder",
    "build_architecture",
    "data_names",
    "default_data",
    "load_data",
    "load_model",
    "model_names",
    "tokenizer",
]
