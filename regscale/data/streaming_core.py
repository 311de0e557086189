"""MosaicML Streaming without its NLP and video datasets.

`import streaming` runs the package's __init__, which imports streaming.text (transformers'
tokenizers and generation utilities, and through them scikit-learn) and streaming.multimodal: about
2 s of CPU (of 4.3 s for the whole package on a 2-core Xeon), paid by every training process, every
spawned DataLoader worker and every `regscale prepare`, for datasets regscale never reads.
`use_streaming_core()` (run by regscale.data's __init__) registers the package with its names
coming from streaming.base (the same classes: StreamingDataset, Stream, MDSWriter, ...), and
streaming.text, .multimodal and .vision loaded only when used. A no-op when streaming was
imported already.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

_ON_DEMAND = ("multimodal", "text", "vision")


def use_streaming_core() -> None:
    """Make `import streaming` register the package without running its __init__: its names
    (StreamingDataset, Stream, MDSWriter, ...) come from streaming.base, loaded on first use, and
    streaming.text, .multimodal and .vision likewise. Costs nothing until streaming is used."""
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    if spec is None or spec.loader is None:
        return  # not installed: the import that needs it says so
    package = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    package.__getattr__ = _load_on_demand
    sys.modules["streaming"] = package


def _load_on_demand(name: str) -> Any:
    if name in _ON_DEMAND:
        return importlib.import_module(f"streaming.{name}")
    if name == "__version__":
        return importlib.import_module("streaming._version").__version__
    base = importlib.import_module("streaming.base")
    if name in base.__all__:
        return getattr(base, name)
    raise AttributeError(f"module 'streaming' has no attribute {name!r}")
