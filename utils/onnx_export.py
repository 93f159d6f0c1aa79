"""Export a trained model to ONNX, check it against PyTorch, and predict from the file alone.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (torch.export with
onnxscript; TorchScript export is deprecated), in eval mode with a dynamic
batch dimension: ``images`` (N, 3, H, W) float32 normalised -> ``logits``
(N, classes). The file's metadata carries what a user of it needs: the class
names, image size, mean and std, and whether the run used the test-time flip.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Preprocess
from .errors import UserError
from .io import atomic_write

# largest |logit difference| accepted between onnxruntime and PyTorch (fp32), relative to the
# largest |logit| (at least 1): float32 rounding differs between the two, and grows with the logits
TOLERANCE = 1e-4


def export(predictor, path) -> None:
    """Write ``predictor``'s model (fp32, eval mode, on the CPU) to ``path`` with its metadata."""
    import onnx

    model = predictor.model.float().cpu().eval().to(memory_format=torch.contiguous_format)
    size = predictor.preprocess.image_size
    example = (torch.zeros(2, 3, size, size),)
    try:
        program = torch.onnx.export(model, example, dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    except ImportError as exc:
        raise UserError(f"ONNX export needs onnx and onnxscript ({exc}): pip install -r requirements.txt") from None
    proto = program.model_proto
    meta = {"classes": json.dumps(predictor.classes), "image_size": str(size),
            "mean": json.dumps(list(predictor.preprocess.mean)), "std": json.dumps(list(predictor.preprocess.std)),
            "tta": json.dumps(bool(predictor.tta)), "model": predictor.name}
    onnx.helper.set_model_props(proto, meta)
    try:
        atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}): choose a writable --export-onnx path") from None


class OnnxPredictor:
    """The ``Predictor`` interface over an exported file: onnxruntime on the CPU, fp32."""

    def __init__(self, path):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--onnx {path} does not exist: pass a file written by --export-onnx")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.classes = json.loads(meta["classes"])
            self.preprocess = Preprocess(int(meta["image_size"]), tuple(json.loads(meta["mean"])),
                                         tuple(json.loads(meta["std"])))
            self.tta = json.loads(meta.get("tta", "false"))
            self.name = meta.get("model", path.name)
        except Exception as exc:  # not ONNX, or ONNX without our metadata: the same to the user
            raise UserError(f"cannot use {path} ({type(exc).__name__}): pass a file written by "
                            "predict.py --export-onnx") from None

    def logits(self, images: np.ndarray) -> torch.Tensor:
        x = self.preprocess.to_tensor(images).numpy()
        out = torch.from_numpy(self.session.run(["logits"], {"images": x})[0])
        if self.tta:
            out = (out + torch.from_numpy(self.session.run(["logits"], {"images": x[..., ::-1].copy()})[0])) / 2
        return out

    def probs(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).softmax(1).numpy()


def check(path, predictor, images: np.ndarray) -> dict:
    """onnxruntime against PyTorch in fp32 on ``images``: largest logit difference and top-1 agreement."""
    onnx_model = OnnxPredictor(path)
    onnx_model.tta = False
    x = predictor.preprocess.to_tensor(images)
    with torch.no_grad():
        reference = predictor.model.float().cpu().eval()(x).numpy()
    got = onnx_model.logits(images).numpy()
    diff = float(np.abs(got - reference).max()) if len(images) else 0.0
    scale = max(1.0, float(np.abs(reference).max())) if len(images) else 1.0
    agree = float((got.argmax(1) == reference.argmax(1)).mean()) if len(images) else 1.0
    return {"images": len(images), "max_abs_diff": diff, "max_abs_logit": scale, "top1_agreement": agree,
            "ok": math.isfinite(diff) and diff <= TOLERANCE * scale}
