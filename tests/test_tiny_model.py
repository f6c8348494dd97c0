"""The tiny LLaVA builds offline from config, saves and loads back with identical outputs."""

import torch

from unveil.data.collate import PromptCollator, SFTCollator
from unveil.models.factory import build_backbone


def test_build_save_load_offline(make_cfg, tmp_path, synthetic_dir):
    from unveil.data.adapters import mau_jsonl

    cfg = make_cfg()
    samples = mau_jsonl.read(synthetic_dir / "train.jsonl")
    corpus = [m["content"] for s in samples for m in s.messages]
    bb = build_backbone(cfg.model, corpus=corpus, cache_dir=tmp_path / "cache")
    n = sum(p.numel() for p in bb.model.parameters())
    assert 1e5 < n < 5e6
    batch = SFTCollator(bb)(samples[:4])
    # labels cover exactly the assistant answer and its end-of-turn token
    for i, s in enumerate(samples[:4]):
        ids = batch["input_ids"][i][batch["labels"][i] != -100]
        assert bb.tokenizer.decode(ids, skip_special_tokens=True).strip() == s.target
    image_token = bb.base_model.config.image_token_index
    patches = (cfg.model.spec.image_size // cfg.model.spec.patch_size) ** 2
    assert int((batch["input_ids"][0] == image_token).sum()) == patches + cfg.model.spec.slot_tokens
    bb.save(tmp_path / "saved")
    from omegaconf import open_dict

    mcfg = cfg.model.copy()
    with open_dict(mcfg):
        mcfg.init_from = str(tmp_path / "saved")
        mcfg.local_files_only = True
    bb2 = build_backbone(mcfg)
    prompt = PromptCollator(bb)(samples[:2])
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        a = bb.model(**{k: prompt[k] for k in keys}).logits
        b = bb2.model(**{k: PromptCollator(bb2)(samples[:2])[k] for k in keys}).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_tokenizer_is_cached_and_deterministic(tmp_path):
    from unveil.models.tokenizer import train_tokenizer

    texts = ["Abnormality detected. Region [12, 30, 25, 44]: nodule."] * 5 + ["No abnormality detected."]
    a = train_tokenizer(texts, 300, tmp_path)
    b = train_tokenizer(texts, 300, tmp_path)
    assert a.get_vocab() == b.get_vocab()
    assert len([p for p in tmp_path.glob("tok-*") if p.is_dir()]) == 1
    # box coordinates of the 0-100 grid are whole tokens, longest match first
    assert [t for t in a.tokenize("[12, 100, 0, 7]") if t.strip("Ġ[,]")] == ["12", "100", "0", "7"]
    assert a.decode(a("Region [5, 100, 0, 99]: mass.")["input_ids"]) == "Region [5, 100, 0, 99]: mass."
