"""A mean-pooled classifier exported as a sentence-transformers folder, loadable without fedslm.

A Hugging Face ``AutoModelForSequenceClassification`` folder cannot say "mean of the token vectors,
then the head": it reads the ``[CLS]`` pooler. sentence-transformers can, with its own modules:

    Transformer (the encoder, LoRA merged in) -> Pooling (mean over real tokens)
    -> Normalize (if the model was trained on unit vectors) -> Dense (the trained head, no activation)

so ``SentenceTransformer(folder).encode(texts)`` returns the classifier's logits, and
``labels.json`` beside them names each logit. The export is reloaded with sentence-transformers
alone and must reproduce fedslm's logits on probe texts (else it is refused, nothing half-written
is left claiming to be a model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fedslm.errors import ModelError
from fedslm.lora.merge import expected_merged_weights, load_tuned

PROBES = ["the patient reports chest pain", "fracture of the left femur after a fall",
          "type 2 diabetes without complications", "a"]


@torch.no_grad()
def export_sentence_transformers(adapter_dir: str | Path, out: str | Path,
                                 device: Optional[torch.device] = None) -> dict[str, Any]:
    """Write ``adapter_dir`` (a mean-pooled classification adapter) to ``out`` as a sentence-transformers
    model and return the checks' figures."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoModel

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} already exists and is not empty; choose a new folder")
    tuned = load_tuned(adapter_dir, device)  # merged on ``device``; saved and checked on the CPU
    meta = tuned.meta
    if meta["task"] != "classification" or meta.get("pooling") != "mean":
        raise ModelError(f"{adapter_dir}: a sentence-transformers export is for mean-pooled classifiers")
    labels = list(meta["labels"])
    max_length = int(meta.get("max_length", 128))
    tokenizer = tuned.base.tokenizer
    probe = tokenizer(PROBES, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    where = next(tuned.model.parameters()).device
    reference = tuned.model(**{k: v.to(where) for k, v in probe.items()}).logits.float().cpu()
    expected = expected_merged_weights(tuned.model)
    merged = tuned.model.merge_and_unload().eval()
    for name, weight in expected.items():
        if not torch.allclose(merged.get_submodule(name).weight, weight, atol=1e-5):
            raise ModelError(f"merged weight {name} differs from W + scale·B·A")
    encoder = merged.base_model
    head = _head(merged)
    # The encoder's [CLS] pooler was replaced by fedslm's parameter-free mean; give the saved encoder a
    # zeroed pooler of its own class so that it loads without "newly initialised" warnings (unused).
    fresh = AutoModel.from_config(encoder.config)
    if getattr(fresh, "pooler", None) is not None:
        for p in fresh.pooler.parameters():
            p.zero_()
        encoder.pooler = fresh.pooler
    staging = Path(tempfile.mkdtemp(prefix=".fedslm-export-", dir=out.parent if out.parent.exists() else None))
    try:
        encoder.save_pretrained(staging / "encoder")
        tokenizer.save_pretrained(staging / "encoder")
        modules: list[nn.Module] = [Transformer(str(staging / "encoder"), max_seq_length=max_length)]
        dim = int(encoder.config.hidden_size)
        modules.append(Pooling(dim, pooling_mode="mean"))
        if meta.get("normalize"):
            modules.append(Normalize())
        modules.append(Dense(dim, len(labels), bias=head.bias is not None, activation_function=nn.Identity(),
                             init_weight=head.weight.detach().cpu().clone(),
                             init_bias=head.bias.detach().cpu().clone() if head.bias is not None else None))
        SentenceTransformer(modules=modules, device="cpu").save(str(staging / "model"))
        (staging / "model" / "labels.json").write_text(json.dumps(labels, indent=1), encoding="utf-8")
        reloaded = SentenceTransformer(str(staging / "model"), device="cpu", local_files_only=True)
        got = reloaded.encode(PROBES, convert_to_tensor=True, batch_size=len(PROBES)).float().cpu()
        err = float((got - reference).abs().max())
        if not err <= 1e-4:
            raise ModelError(f"the sentence-transformers export's logits differ from base + adapter by {err:.3g}")
        report = {"adapter": str(adapter_dir), "base": meta["model"], "format": "sentence-transformers",
                  "modules": [type(m).__name__ for m in modules], "labels": len(labels),
                  "lora_layers": len(expected), "max_logit_error": err}
        (staging / "model" / "fedslm-export.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging / "model"), str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _head(model: nn.Module) -> nn.Linear:
    """The classifier's final linear layer (BERT family: ``classifier``)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    raise ModelError(f"cannot find the linear classifier head of {type(model).__name__}")
