"""The shared coordinate code: Fourier features, their read-out, the number-token rows and the
detector pool of the conv tower."""

import torch

from unveil.models.coord_features import fourier, init_number_rows
from unveil.models.vision_pretrain import code_loss, decode_code, patch_targets


def test_fourier_code_decodes_back_to_the_grid_value():
    g = torch.Generator().manual_seed(0)
    boxes = torch.randint(0, 101, (200, 4), generator=g) / 100
    code = fourier(boxes).flatten(-2)  # (200, 4 * 2F)
    assert code.shape == (200, 48)
    assert torch.equal(decode_code(code), boxes)


def test_code_loss_prefers_the_true_box_and_has_gradients():
    box = torch.tensor([[0.20, 0.30, 0.45, 0.60]])
    right = (5.0 * fourier(box).flatten(-2)).requires_grad_(True)
    wrong = 5.0 * fourier(torch.tensor([[0.70, 0.05, 0.90, 0.25]])).flatten(-2)
    assert code_loss(right, box) < code_loss(wrong, box)
    code_loss(right, box).backward()
    assert torch.isfinite(right.grad).all() and right.grad.abs().sum() > 0


def test_number_rows_are_smooth_in_value(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unveil.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["Region [12, 30, 25, 44]: nodule."] * 5, 300, tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    assert init_number_rows(model, tok) == 101
    rows = model.get_output_embeddings().weight[[tok.convert_tokens_to_ids(str(v)) for v in range(101)]]
    rows = torch.nn.functional.normalize(rows, dim=-1)
    sim = rows @ rows.T
    near = torch.stack([sim[v, v + 1] for v in range(100)]).mean()
    far = torch.stack([sim[v, (v + 50) % 101] for v in range(101)]).mean()
    assert near > far + 0.3


def test_patch_targets_point_at_the_first_box_in_reading_order():
    from unveil.data.schema import Sample

    s = Sample(
        id="a",
        images=["x.png"],
        messages=[{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
        boxes=[[0.6, 0.1, 0.9, 0.4], [0.1, 0.5, 0.3, 0.8]],
        findings=["mass", "cyst"],
        task="localize",
    )
    cls, box, first, first_box = patch_targets([s], 8, ["cyst", "mass"])
    assert torch.allclose(first_box[0], torch.tensor([0.1, 0.5, 0.3, 0.8]))  # leftmost, not listed first
    assert first[0].any() and (cls[0][first[0]] == 1).all()  # cyst patches
    assert torch.allclose(box[0][first[0]], first_box[0].expand(int(first[0].sum()), 4))
    assert (cls[0] == 2).any() and not first[0][cls[0] == 2].any()


def test_detector_pool_adds_one_pooled_token_to_every_patch():
    from unveil.models.conv_vision import ConvVisionConfig, ConvVisionModel

    tower = ConvVisionModel(ConvVisionConfig(image_size=32, patch_size=8, hidden_size=16, widths=(8, 8)))
    px = torch.randn(2, 3, 32, 32)
    x, _, logits, pooled = tower.encode(px)
    out = tower(px).last_hidden_state
    assert logits.shape == (2, 16) and pooled.shape == (2, 16)
    assert torch.allclose(out - x, pooled.unsqueeze(1).expand_as(x), atol=1e-6)  # identity-initialised projection
    weights = logits.softmax(-1)
    assert torch.allclose(pooled, torch.einsum("bn,bnc->bc", weights, x), atol=1e-6)
