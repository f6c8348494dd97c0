"""The one home for running the policy (``unveil.models.policy``), on the real architectures.

- The prompt once per group: log-probs and every parameter's gradient equal the unshared
  computation (<= 1e-5 in fp32) on tiny LLaVA, Qwen2-VL, Qwen2.5-VL and Idefics3, LoRA and full,
  one and two images per prompt.
- Memory-bounded log-probs: chunked, checkpointed log-softmax equals the full-vocabulary one, its
  gradient too, and the entropy matches.
- Attention mass without maps: equals the mass read off eager attention maps (<= 1e-5).
"""

from __future__ import annotations

import pytest
import torch

# the fixtures that build the tiny architectures
from test_backbones import dm, localize_samples, make_backbone, two_image_sample  # noqa: F401

from unveil.data.collate import PromptCollator
from unveil.models import policy
from unveil.stages.rollout import sample_rollouts

ARCHS = ["llava15", "qwen2_vl", "qwen25_vl", "idefics3"]


def rollout_for(bb, samples, g: int = 3, tokens: int = 6):
    torch.manual_seed(0)
    return sample_rollouts(bb, PromptCollator(bb)(samples), num_generations=g, max_new_tokens=tokens)


def logps_and_grads(model, ro, share: bool):
    model.zero_grad(set_to_none=True)
    lp = ro.logprobs(model, share_prompt=share, with_entropy=True)
    (lp.logps.sum() + 0.1 * (lp.logps.exp() * ro.completion_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp, grads


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_equals_unshared_logps_and_gradients(make_backbone, dm, arch, images, peft):  # noqa: F811
    bb = make_backbone(arch, f"peft={peft}", "model.dtype=float32")
    samples = localize_samples(dm, 2)[:2] if images == 1 else [two_image_sample(dm), localize_samples(dm, 1)[0]]
    ro = rollout_for(bb, samples)
    assert ro.completion_mask.sum() > 0 and len(torch.unique(ro.group)) < len(ro)
    model = bb.model.train()
    policy.disable_dropout(model)
    shared, g_shared = logps_and_grads(model, ro, share=True)
    whole, g_whole = logps_and_grads(model, ro, share=False)
    torch.testing.assert_close(shared.logps, whole.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, whole.entropy, atol=1e-5, rtol=1e-5)
    assert g_shared.keys() == g_whole.keys() and g_shared
    if peft == "lora":
        assert all("lora_" in n for n in g_shared)
    for n in g_whole:
        torch.testing.assert_close(g_shared[n], g_whole[n], atol=1e-5, rtol=1e-4, msg=n)


def test_shared_prompt_runs_the_vision_tower_once_per_prompt(make_backbone, dm):  # noqa: F811
    bb = make_backbone("llava15")
    ro = rollout_for(bb, localize_samples(dm, 2)[:2], g=4)
    tower = policy.unwrap(bb.model).model.vision_tower
    seen = []
    h = tower.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            policy.completion_logprobs(
                bb.model, ro.inputs, ro.completion_ids, ro.completion_mask, group=ro.group, n_images=ro.n_images
            )
            policy.completion_logprobs(bb.model, ro.inputs, ro.completion_ids, ro.completion_mask)
    finally:
        h.remove()
    assert seen == [2, 8]  # 2 prompts x 1 image shared; 8 completions unshared


class _WrappedHead(torch.nn.Module):
    """A head that is not a plain Linear (as PEFT wraps one): the checkpointed per-chunk path."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear
        self.weight = linear.weight

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logsoftmax_equals_the_full_vocabulary_one(wrapped, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 1000, bias=bias)
    head = _WrappedHead(linear) if wrapped else linear
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    lp, ent = policy.token_logprobs(head, hidden, targets, mask, temperature=0.7, with_entropy=True, chunk_tokens=4)
    (lp * torch.linspace(0.5, 2, 7)).sum().backward()
    got = [hidden.grad.clone()] + [p.grad.clone() for p in linear.parameters()]
    hidden.grad = None
    linear.zero_grad(set_to_none=True)
    full = torch.log_softmax(linear(hidden) / 0.7, -1)
    want = full.gather(-1, targets[..., None]).squeeze(-1) * mask
    (want * torch.linspace(0.5, 2, 7)).sum().backward()
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got, [hidden.grad] + [p.grad for p in linear.parameters()]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    want_ent = -(full.exp() * full).sum(-1) * mask
    torch.testing.assert_close(ent, want_ent.detach(), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad  # no graph unless a loss term needs it
    _, ent_g = policy.token_logprobs(head, hidden, targets, mask, with_entropy=True, entropy_grad=True)
    assert ent_g.requires_grad


def test_chunked_head_keeps_one_weight_gradient_buffer():
    """The chunks' head-weight gradients accumulate in one [V, H] buffer (the parameter's final
    .grad): besides it, the backward holds less than one more weight-sized tensor, where a head
    checkpointed per chunk (the wrapped path) held three. Measured with bench_memory's tracker."""
    from conftest import load_experiment

    measure = load_experiment("bench_memory").measure
    torch.manual_seed(0)
    hidden, targets = torch.randn(1, 64, 32), torch.randint(0, 4096, (1, 64))
    peaks = {}
    for wrapped in (False, True):
        linear = torch.nn.Linear(32, 4096, bias=False)
        head = _WrappedHead(linear) if wrapped else linear

        def run(h):
            lp, _ = policy.token_logprobs(h, hidden, targets, torch.ones(1, 64), chunk_tokens=8)
            lp.sum().backward()

        peaks[wrapped] = measure(run, head).peak  # the final .grad left out
    wbytes = 4096 * 32 * 4
    assert peaks[False] < wbytes < 2 * wbytes < peaks[True], peaks


def eager_mass(bb, ro, weights):
    """The reference: attention maps from an eager pass (output_attentions), mass on the weighted keys."""
    model = bb.model
    base = policy.unwrap(model)
    prev = base.config.get_text_config()._attn_implementation
    base.set_attn_implementation("eager")
    try:
        t = ro.completion_ids.shape[1]
        inputs = dict(ro.inputs)
        ids = torch.cat([inputs.pop("input_ids"), ro.completion_ids], 1)
        am = torch.cat([inputs.pop("attention_mask"), ro.completion_mask], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(ro.completion_ids)], 1
            )
        if "image_grid_thw" not in inputs:
            inputs["position_ids"] = policy.position_ids_from_mask(am)
        with torch.no_grad(), policy.eval_mode(model):
            out = model(input_ids=ids, attention_mask=am, output_attentions=True, use_cache=False, **inputs)
        return torch.stack([(a[:, :, -(t + 1) :].float() * weights[:, None, None, :]).sum(-1) for a in out.attentions])
    finally:
        base.set_attn_implementation(prev)


@pytest.mark.parametrize("share", ["one_pass", "a_row_per_pass", False])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_mass_equals_the_eager_maps(make_backbone, dm, arch, share, monkeypatch):  # noqa: F811
    """The mass from the captured sdpa pass equals the eager maps': unshared, shared with all
    completions in one pass over the prompt's cache, and shared a completion at a time (what a 7B
    model's KV_COPY_BYTES budget gives)."""
    if share == "a_row_per_pass":
        monkeypatch.setattr(policy, "KV_COPY_BYTES", 1)
    bb = make_backbone(arch, "model.dtype=float32")
    samples = [two_image_sample(dm), localize_samples(dm, 1)[0]]
    ro = rollout_for(bb, samples)
    n, p = ro.inputs["input_ids"].shape
    torch.manual_seed(1)
    weights = (torch.rand(n, p + ro.completion_ids.shape[1]) < 0.3).float()
    weights[:, :p] = weights[ro.group * 3, :p]  # the prompt's keys weigh the same for all G of its completions
    want = eager_mass(bb, ro, weights)
    got, logps = policy.key_mass(
        bb.model,
        ro.inputs,
        ro.completion_ids,
        ro.completion_mask,
        weights,
        group=ro.group if share else None,
        n_images=ro.n_images,
    )
    assert got.shape == want.shape
    valid = torch.cat([torch.ones(n, 1), ro.completion_mask.float()], 1).bool()  # padded queries are ignored
    torch.testing.assert_close(got.permute(1, 3, 0, 2)[valid], want.permute(1, 3, 0, 2)[valid], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        ref = policy.completion_logprobs(bb.model, ro.inputs, ro.completion_ids, ro.completion_mask).logps
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_once_generates_what_repeated_prompts_generate(make_backbone, dm, arch):  # noqa: F811
    """Sampled (same seed) and greedy completions are the same whether generate() runs each prompt
    G times or the prompts are prefilled once and their KV cache repeated."""
    from unveil.models.generation import generate
    from unveil.models.inputs import select_inputs

    bb = make_backbone(arch)
    samples = [two_image_sample(dm), *localize_samples(dm, 2)[:2]]
    batch = PromptCollator(bb)(samples)
    outs = []
    for share in (False, True):
        torch.manual_seed(3)
        outs.append(generate(bb, batch, 6, do_sample=True, num_return_sequences=3, share_prompt=share))
    assert outs[0]["completion_ids"].shape[0] == 9 and torch.equal(
        outs[0]["completion_ids"], outs[1]["completion_ids"]
    )
    # greedy: generate() refuses G > 1, so the reference is the batch with each prompt repeated
    repeated = {**batch, **select_inputs(batch, torch.arange(3).repeat_interleave(3), [2, 1, 1])}
    want = generate(bb, repeated, 6)["completion_ids"]
    got = generate(bb, batch, 6, num_return_sequences=3, share_prompt=True)["completion_ids"]
    assert torch.equal(want, got)


def test_a_checkpoints_generation_config_does_not_change_what_rl_samples(make_backbone, dm):  # noqa: F811
    """Qwen2-VL's generation_config.json says top_k=1, top_p=0.001, repetition_penalty=1.05: generate()
    fills every setting it is not given from there, which made RL's G completions of a prompt one
    near-greedy answer, sampled off the distribution its log-probs are computed under."""
    from unveil.models.generation import generate

    bb = make_backbone("qwen2_vl")
    batch = PromptCollator(bb)(localize_samples(dm, 2)[:2])

    def sample(share: bool) -> torch.Tensor:
        torch.manual_seed(5)
        return generate(bb, batch, 8, do_sample=True, num_return_sequences=4, share_prompt=share)["completion_ids"]

    clean = {share: sample(share) for share in (False, True)}
    assert torch.equal(clean[False], clean[True])
    assert len({tuple(r.tolist()) for r in clean[True][:4]}) > 1  # four different answers to one prompt
    gc = bb.model.generation_config
    saved = gc.to_dict()
    # values a checkpoint may ship (these two strong enough to change 8 sampled tokens for sure)
    gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.no_repeat_ngram_size = 1, 0.001, 0.01, 3.0, 1
    try:
        for share in (False, True):  # generate() (unshared) and the lean loop (shared) alike
            assert torch.equal(sample(share), clean[share])
    finally:
        gc.update(**saved)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_through_answer_logprobs_equals_hf_labels_loss(make_backbone, dm, arch):  # noqa: F811
    """SFT's loss (answer positions only reach the LM head, chunked) and its gradients equal HF's
    cross-entropy with labels, which computes the full-vocabulary logits at every position."""
    from unveil.models.inputs import model_inputs
    from unveil.stages.sft import SFTModule

    bb = make_backbone(arch, "model.dtype=float32")
    module = SFTModule(bb)
    batch = module.collator([two_image_sample(dm), *localize_samples(dm, 2)])
    model = bb.model.train()
    policy.disable_dropout(model)
    grads = []
    for loss_fn in (module, lambda b: model(**model_inputs(b), labels=b["labels"]).loss):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ours, g_ours), (hf, g_hf) = grads
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-6)
    assert g_ours.keys() == g_hf.keys()
    for n in g_hf:
        torch.testing.assert_close(g_ours[n], g_hf[n], atol=1e-6, rtol=1e-4, msg=n)


def test_no_grad_passes_share_the_prompt_under_activation_checkpointing(make_backbone, dm):  # noqa: F811
    """HF layers drop the KV cache under gradient checkpointing in train mode, with or without
    gradients: a no-grad pass (reference, old policy) runs in eval mode and shares; a pass with
    gradients runs every row whole. Both give the unshared log-probs."""
    bb = make_backbone("llava15", "model.dtype=float32")
    ro = rollout_for(bb, localize_samples(dm, 2)[:2])
    model = bb.model
    policy.disable_dropout(model)
    with torch.no_grad():
        want = ro.logprobs(model, share_prompt=False).logps
    policy.unwrap(model).gradient_checkpointing_enable()
    try:
        model.train()
        with torch.no_grad():
            got = ro.logprobs(model).logps
        assert model.training  # put back
        with_grad = ro.logprobs(model).logps
    finally:
        policy.unwrap(model).gradient_checkpointing_disable()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_grad.detach(), want, atol=1e-5, rtol=1e-5)
