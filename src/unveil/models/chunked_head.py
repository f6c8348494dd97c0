"""Log-probs of chosen tokens through a linear LM head, a few tokens at a time, forward and backward.

For hidden states ``h`` ``[M, H]``, head ``W`` ``[V, H]`` (bias ``b``), targets ``y`` and temperature ``tau``:

    z = (h W^T + b) / tau,   log p(y) = z_y - logsumexp(z),   H(p) = logsumexp(z) - sum_v p_v z_v
    d log p(y) / d z = onehot(y) - softmax(z)
    dh = (dz / tau) W,       dW += (dz / tau)^T h,       db += sum(dz / tau)

Each chunk's ``[tokens, V]`` logits exist only while that chunk is computed, in the forward and
again in the backward, where the chunks' weight gradients accumulate into one ``[V, H]`` buffer
(autograd, with the head used once per chunk, would hold several). The entropy is returned without
a graph.
"""

from __future__ import annotations

import torch


def _logits(h, weight, bias, temperature: float) -> torch.Tensor:
    z = torch.nn.functional.linear(h, weight, bias).float()
    return z.div_(temperature) if temperature != 1.0 else z


class ChunkedHeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, temperature: float, step: int, with_entropy: bool):
        logps = h.new_empty(h.shape[0], dtype=torch.float32)
        entropy = h.new_empty(h.shape[0], dtype=torch.float32) if with_entropy else None
        for s in range(0, h.shape[0], step):
            z = _logits(h[s : s + step], weight, bias, temperature)
            lse = z.logsumexp(-1)
            logps[s : s + step] = z.gather(-1, y[s : s + step, None]).squeeze(-1) - lse
            if with_entropy:  # lse - sum p z, with p computed in place of z's copy
                p = (z - lse[:, None]).exp_()
                entropy[s : s + step] = lse - p.mul_(z).sum(-1)
        ctx.save_for_backward(h, weight, bias, y)
        ctx.temperature, ctx.step = temperature, step
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        h, weight, bias, y = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b and bias is not None else None
        for s in range(0, h.shape[0], ctx.step):
            hs, g = h[s : s + ctx.step], grad_logps[s : s + ctx.step].float()
            dz = torch.softmax(_logits(hs, weight, bias, ctx.temperature), -1).mul_(-g[:, None])
            dz[torch.arange(len(hs), device=dz.device), y[s : s + ctx.step]] += g
            dz = dz.div_(ctx.temperature).to(weight.dtype)
            if gh is not None:
                gh[s : s + ctx.step] = (dz @ weight).to(h.dtype)
            if gw is not None:
                gw.addmm_(dz.t(), hs.to(weight.dtype))
            if gb is not None:
                gb += dz.sum(0).to(gb.dtype)
        return gh, gw, gb, None, None, None, None


def chunked_head_logprobs(head: torch.nn.Linear, h, y, temperature: float, step: int, with_entropy: bool):
    """(``[M]`` log-probs of ``y``, ``[M]`` entropies or None) through ``head``, ``step`` tokens at a time."""
    return ChunkedHeadLogprobs.apply(h, head.weight, head.bias, y, float(temperature), int(step), with_entropy)
