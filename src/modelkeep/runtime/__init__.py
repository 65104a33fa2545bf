"""Loading verified model bytes into runtimes and running them; one module per runtime.

``modelkeep.runtime.signature`` describes what a model accepts and returns and is light to
import (the tensor codec in ``guard/`` needs only it). Runtime modules such as
``modelkeep.runtime.onnx`` are imported by name, so importing this package never loads a
runtime library.
"""

from modelkeep.runtime.signature import (
    V2_DATATYPES,
    ModelSignature,
    TensorSpec,
    numpy_dtype,
    v2_datatype,
)

__all__ = ["V2_DATATYPES", "ModelSignature", "TensorSpec", "numpy_dtype", "v2_datatype"]
