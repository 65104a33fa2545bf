"""Model-extraction detection over each client's query stream.

Three detectors, fed after inference with what the client sent (and, for PRADA, what the model
answered), each returning a :class:`DetectionResult` per call:

* :class:`PradaDetector` (Juuti et al. 2019) flags streams whose query-to-query distances are
  not normally distributed, the signature of synthetic and boundary-probing attacks. Its
  threshold comes from benign traffic through :func:`calibrate_prada`.
* :class:`OodMonitor` flags clients most of whose recent queries lie far from the training
  data, against an :class:`OodReference` fitted at push time and stored as JSON with the version.

* :class:`NearCopyDetector` flags clients that send many near-copies of one input (noisy-copy
  membership probing, label-only boundary attacks), from LSH signatures of a short window.

None of them catches an attacker who only sends natural samples of the training distribution; output
hardening (``guard.hardening``) and query budgets are the answer there. State lives behind
:class:`DetectorState`: in-process by default, shareable between replicas by implementing it.
Key the client by caller *and* model version: streams of different models must not mix.
"""

from modelkeep.guard._detector_state import DetectionResult, DetectorState, InMemoryDetectorState
from modelkeep.guard._nearcopy import NearCopyConfig, NearCopyDetector, calibrate_nearcopy
from modelkeep.guard._ood import OodMonitor, OodReference
from modelkeep.guard._prada import PradaConfig, PradaDetector, calibrate_prada, shapiro_w

__all__ = [
    "DetectionResult",
    "DetectorState",
    "InMemoryDetectorState",
    "NearCopyConfig",
    "NearCopyDetector",
    "OodMonitor",
    "OodReference",
    "PradaConfig",
    "PradaDetector",
    "calibrate_nearcopy",
    "calibrate_prada",
    "shapiro_w",
]
