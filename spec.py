# The step functions and the acceptance math: an autoregressive decode step, a draft step against a
# sparse draft cache, a verify step (one target forward over gamma + 1 tokens) and exact acceptance
# (Leviathan et al. 2211.17192; Chen et al. 2302.01318). A step is a plain function of a model, its
# caches and tensors: it knows no engine, so it is what an engine compiles or captures as one graph.
# Every row moves independently and nothing here reads a tensor back to the host.
#
# Greedy decoding is the special case where every distribution is one-hot on its argmax: a draft
# token is then accepted iff it equals the target argmax, and the residual distribution is one-hot
# on the target argmax. accept_greedy computes exactly that case from the argmaxes (tested against
# accept() on one-hot inputs), so greedy results are exact argmaxes, not a low-temperature
# approximation, and never pay for [B, gamma+1, V] distributions.
from dataclasses import dataclass

import torch

from model import run_block


@dataclass(frozen=True)
class Sampling:
    """How one request's (or a whole batch's) tokens are drawn."""
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    @property
    def kind(self) -> str:
        return "greedy" if self.temperature == 0 else "filtered" if self.top_k > 0 or self.top_p < 1 else "sampled"


KINDS = ("greedy", "sampled", "filtered")  # each kind covers the ones before it


def widest_kind(settings) -> str:
    """The kind a step must be specialized on to serve every one of these Sampling settings."""
    return max((s.kind for s in settings), key=KINDS.index)


@dataclass
class RowSampling:
    """Every row's sampling settings as device tensors [B], so that the rows of one batch (the
    requests of a stream) each sample their own way with no step compiled or captured per setting.
    kind, the one static part, is the most general among the rows (KINDS): a "greedy" step builds
    no distributions, a "sampled" one skips top-k/top-p's sort over the vocabulary; a greedy row in
    a sampling step still gets exact argmaxes."""
    temperature: torch.Tensor  # [B] float32, 0: greedy
    top_k: torch.Tensor  # [B] int64, 0: off
    top_p: torch.Tensor  # [B] float32, 1: off
    kind: str

    @classmethod
    def of(cls, s: Sampling, batch: int, device) -> "RowSampling":
        full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)  # noqa: E731
        return cls(full(s.temperature, torch.float32), full(s.top_k, torch.long), full(s.top_p, torch.float32), s.kind)

    @property
    def tensors(self) -> tuple:
        return self.temperature, self.top_k, self.top_p


DRAFT_CANDIDATES = 1024  # a draft's top-k / top-p filter ranks only its most likely tokens


def logits_to_probs(logits: torch.Tensor, rs: RowSampling, candidates: int = 0) -> torch.Tensor:
    """[B, ..., V] fp32 logits -> the distributions tokens are drawn from, each row with its own
    temperature, top-k and top-p (one-hot on the argmax for a greedy row). candidates > 0: top-k and
    top-p rank only the `candidates` most likely tokens (torch.topk, not a sort of the whole
    vocabulary, which at 8 rows on a CPU costs about as much as a draft step) and drop the rest, which is the exact
    filter wherever the kept tokens are among them. A draft's distribution may be any one it
    samples from (rejection sampling keeps the target's distribution whatever the draft's), so
    drafts use it; the target's distribution is always exact."""
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if rs.kind == "greedy":
        return one_hot
    per_row = lambda t: t.view(-1, *[1] * (logits.dim() - 1))  # noqa: E731  [B] -> [B, 1, ..., 1]
    greedy = per_row(rs.temperature == 0)
    # shifted first, so that any finite temperature is well defined: a tiny one leaves the argmax
    # (ties split evenly) instead of overflowing to NaN, a huge one approaches uniform
    logits = (logits - logits.amax(-1, keepdim=True)) / per_row(torch.where(rs.temperature == 0, 1.0, rs.temperature))
    if rs.kind == "filtered":
        V = logits.shape[-1]
        n_ranked = min(candidates or V, V)
        sorted_logits, order = logits.topk(n_ranked, -1) if n_ranked < V else logits.sort(-1, descending=True)
        # top-k: drop what ranks below the k-th value (ties with it stay)
        k = per_row(torch.where(rs.top_k > 0, rs.top_k.clamp(max=n_ranked), n_ranked) - 1)
        kth = sorted_logits.gather(-1, k.expand(*logits.shape[:-1], 1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        # top-p, over what top-k kept: drop a token when the tokens ranked above it already reach
        # top_p (the first always stays)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs >= per_row(rs.top_p)) & per_row(rs.top_p < 1)
        keep_sorted = ~drop_sorted & (sorted_logits > float("-inf"))
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_sorted)  # unranked: dropped
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.where(greedy, one_hot, logits.softmax(-1))


def sample(weights: torch.Tensor) -> torch.Tensor:
    """One categorical sample per row of non-negative weights [..., V] (need not sum to 1), without a
    host sync: argmax(w / E) with E ~ Exp(1) picks index i with probability w_i / sum(w)."""
    noise = torch.empty_like(weights).exponential_(1)
    return (weights / noise).argmax(-1)


def where_greedy(rs: RowSampling, greedy_value: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """greedy_value for greedy rows, value for the others ([B, ...] each)."""
    greedy = (rs.temperature == 0).view(-1, *[1] * (value.dim() - 1))
    return torch.where(greedy, greedy_value, value)


def next_token(logits: torch.Tensor, rs: RowSampling) -> torch.Tensor:
    """[B, V] logits -> one token per row: its argmax (greedy rows) or a sample."""
    if rs.kind == "greedy":
        return logits.argmax(-1)
    return where_greedy(rs, logits.argmax(-1), sample(logits_to_probs(logits, rs)))


def decode_step(model, cache, cur, pos, rs: RowSampling, block=run_block):
    """One autoregressive step for every row: cur, pos [B] -> next token [B]."""
    return next_token(model(cur[:, None], pos[:, None], cache, block=block)[:, -1], rs)


def draft_step(draft_model, draft_cache, tokens, input_pos, rs: RowSampling, block=run_block):
    """tokens, input_pos [B, T] -> next draft token [B] and its distribution q [B, V] (None in a
    greedy step: the draft's argmax is all the verification needs; a greedy row's q is one-hot)."""
    logits = draft_model(tokens, input_pos, draft_cache, block=block)[:, -1]
    if rs.kind == "greedy":
        return logits.argmax(-1), None
    q = logits_to_probs(logits, rs, candidates=DRAFT_CANDIDATES)
    return where_greedy(rs, logits.argmax(-1), sample(q)), q


def accept(p, q, drafts):
    """p [B, g+1, V] target, q [B, g, V] draft distributions, drafts [B, g].
    -> n_accept [B] (leading drafts accepted) and the token that follows them [B]: a sample of
    normalize(max(0, p - q)) at the first rejection, or of p after the last draft (the bonus)."""
    B, g, V = q.shape
    p_draft = p[:, :g].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    accepted = torch.rand_like(p_draft) * q_draft < p_draft  # P = min(1, p/q)
    n_accept = accepted.int().cumprod(1).sum(1)
    q_next = torch.cat([q, q.new_zeros(B, 1, V)], 1)  # q = 0 after the last draft: residual = p
    at = n_accept[:, None, None].expand(-1, 1, V)
    p_n, q_n = p.gather(1, at)[:, 0], q_next.gather(1, at)[:, 0]
    residual = (p_n - q_n).clamp(min=0)
    # p_n == q_n leaves nothing; that draft was then accepted surely, so this only guards rounding
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n_accept, sample(residual)


def accept_greedy(target_tokens, drafts):
    """accept() for one-hot p and q, from argmaxes alone: target_tokens [B, g+1] (the target's argmax
    after each prefix), drafts [B, g] -> n_accept [B], next token [B]. Greedy never builds the
    [B, g+1, V] one-hot distributions, which at large batch cost more memory traffic than the draft."""
    n_accept = (drafts == target_tokens[:, :-1]).int().cumprod(1).sum(1)
    return n_accept, target_tokens.gather(1, n_accept[:, None])[:, 0]


def verify_step(target, cache, cur, drafts, q, pos, rs: RowSampling, refresh=None, reselect=None, block=run_block):
    """Target forward over [cur, drafts] at positions pos .. pos + g, then acceptance: greedy rows by
    their argmaxes, the others by rejection sampling with their own settings.
    cur, pos [B]; drafts [B, g]; q [B, g, V] (None in a greedy step) -> n_accept [B], next token [B].
    refresh: a draft cache that also gets the target's K/V of these positions, in the same step.
    reselect: a draft cache whose fixed entries this step re-picks from the target's attention to
    every cached position (a scored verify; kv_cache.LayerDraftKV.repick)."""
    tokens = torch.cat([cur[:, None], drafts], 1)
    input_pos = pos[:, None] + torch.arange(tokens.shape[1], device=pos.device)
    logits = target(tokens, input_pos, cache, refresh=refresh, reselect=reselect, block=block)
    n_greedy, next_greedy = accept_greedy(logits.argmax(-1), drafts)
    if rs.kind == "greedy":
        return n_greedy, next_greedy
    n_accept, next_sampled = accept(logits_to_probs(logits, rs), q, drafts)
    return where_greedy(rs, n_greedy, n_accept), where_greedy(rs, next_greedy, next_sampled)
