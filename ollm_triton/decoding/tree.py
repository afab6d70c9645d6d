"""`tree`: the draft expands a token tree, the target verifies every node in one forward with a tree mask.

Drafting (batch 1): the root is the pending token. Level 1 holds the draft's top `branching` tokens after the root;
each next level takes the top `branching` children of every node of the previous level and keeps the `width` of
them with the highest cumulative draft log-probability (a beam that keeps its pruned siblings as candidates).
The draft computes level l+1 with one forward over all nodes so far under their ancestor mask (the engine's
`tree_mask` covers only the new tokens, so the nodes are re-fed each level and the draft cache is truncated back
to the root afterwards): `depth` draft forwards per iteration, as many as a chain of `depth` drafts.

Verification: one target forward over [root, nodes] with `positions` = root position + node depth and the ancestor
mask. From the root, the walk follows the child whose token equals the target's argmax; the path's tokens and the
target's argmax at its end are emitted: token for token what `greedy` emits (greedy only: tree speculative
sampling is not implemented).

KV compaction: the verify forward appended every node's K/V. `compaction=gather` (default) keeps the accepted
path's K/V in place: through the layer's own `keep(start, indices)` when a codec defines one, else generically by
reading the layer's dense K/V of the path, truncating to the root and appending them again (exact for dense, a
copy of path-length tokens per layer; a lossy codec re-encodes its own decoded values). `compaction=rerun`
truncates to the pre-tree length and re-runs the path through the target: one more target forward per iteration
(counted in target_forwards), but the cache then holds exactly what sequential decoding would have stored, for any
codec. Gather is the default because the extra forward costs as much as the verification itself at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.decoding.base import DecoderStrategy, Generation
from ollm_triton.decoding.drafters import DraftEngineHolder, ModelDrafter, StaticModelDrafter, fit_vocab
from ollm_triton.decoding.speculation import EmittedTokens, LoopStats, Sampling, speculation_counters
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import StrategyFields
from ollm_triton.decoding.targets import make_target
from ollm_triton.registry import register
from ollm_triton.timing import Timer


@dataclass
class TreeConfig(StrategyFields):
    draft: str = "embedded:tiny-llama-draft"  # embedded:NAME | checkpoint dir | random:<json|conf/model preset>
    depth: int = 5  # tree levels = longest acceptable run of drafts
    branching: int = 2  # children (draft top-k) expanded per node
    width: int = 4  # nodes kept per level
    compaction: str = "gather"  # gather | rerun (see the module docstring)

    def check(self) -> None:
        if not 1 <= self.depth <= 32 or not 1 <= self.branching <= 16 or not 1 <= self.width <= 32:
            raise ValueError(f"need depth in [1, 32], branching in [1, 16], width in [1, 32]; got depth={self.depth}, "
                             f"branching={self.branching}, width={self.width}")
        if self.compaction not in ("gather", "rerun"):
            raise ValueError(f"compaction must be gather or rerun, got {self.compaction!r}")
        super().check()


def level_sizes(depth: int, branching: int, width: int) -> list[int]:
    sizes, prev = [], 1
    for _ in range(depth):
        prev = min(width, prev * branching)
        sizes.append(prev)
    return sizes


@dataclass
class Tree:
    """Nodes in level order (every parent before its children). tokens, parents (-1 = the root), depths: [N];
    ancestors: bool [N, N], True where node j is node i or one of its ancestors."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    ancestors: torch.Tensor


def expand_tree(root_logits: torch.Tensor, forward_level, sizes: list[int], branching: int) -> Tree:
    """The draft tree (batch 1) from the draft's logits after the root [V]. forward_level(tokens [N], depths [N],
    ancestors [N, N]) -> the draft's logits [N, V] for every node so far. No host sync: shapes depend only on
    `sizes`."""
    dev = root_logits.device
    scores, tokens = torch.log_softmax(root_logits, -1).topk(sizes[0])
    parents = torch.full((sizes[0],), -1, dtype=torch.long, device=dev)
    depths = torch.ones(sizes[0], dtype=torch.long, device=dev)
    ancestors = torch.eye(sizes[0], dtype=torch.bool, device=dev)
    frontier = torch.arange(sizes[0], device=dev)
    for level, size in enumerate(sizes[1:], start=2):
        logits = forward_level(tokens, depths, ancestors)
        logp = torch.log_softmax(logits[frontier], -1)  # [F, V]
        child_scores, child_tokens = logp.topk(branching, dim=-1)  # [F, b]
        cand = (scores[frontier, None] + child_scores).reshape(-1)
        best_scores, pick = cand.topk(size)
        new_parents = frontier[pick // branching]
        n = tokens.shape[0]
        rows = torch.cat((ancestors[new_parents], torch.eye(size, dtype=torch.bool, device=dev)), dim=1)
        ancestors = torch.cat((torch.cat((ancestors, ancestors.new_zeros(n, size)), dim=1), rows), dim=0)
        tokens = torch.cat((tokens, child_tokens.reshape(-1)[pick]))
        scores = torch.cat((scores, best_scores))
        parents = torch.cat((parents, new_parents))
        depths = torch.cat((depths, torch.full((size,), level, dtype=torch.long, device=dev)))
        frontier = torch.arange(n, n + size, device=dev)
    return Tree(tokens, parents, depths, ancestors)


class TreeDrafter(ModelDrafter):
    """Eager draft: the catch-up forward gives the root's children, each level re-feeds all nodes under their
    ancestor mask, then the draft cache is truncated back to the root."""

    def expand(self, seq: torch.Tensor, seq_len: int, sizes: list[int], branching: int) -> Tree:
        cache = self.cache
        root_logits = self._forward(seq[:, cache.position : seq_len])[0]  # catch-up + root, causal

        def level(tokens, depths, ancestors):
            self.forwards += 1
            logits = self.engine.forward(tokens[None], cache, positions=seq_len - 1 + depths, tree_mask=ancestors)
            cache.truncate(seq_len)  # keep the draft cache at the root: the next level re-feeds every node
            return fit_vocab(logits[0], self.vocab)

        return expand_tree(root_logits, level, sizes, branching)


class StaticTreeDrafter(StaticModelDrafter):
    """The same tree on the draft's static buffers: single-token catch-up steps, then one tree step per level
    writing the nodes at the slots after the root (rewritten by the next level, never committed). The whole
    expansion after the catch-up (every level's step and the top-k bookkeeping between them, ~20 small ops a level)
    is one function of static buffers: one graph replay on the GPU."""

    def expand(self, seq: torch.Tensor, seq_len: int, sizes: list[int], branching: int) -> Tree:
        root_logits = self.catch_up(seq, seq_len)
        root_in, base_in = self._inputs()
        root_in.copy_(root_logits[0])
        base_in.fill_(seq_len)  # slot after the root; RoPE position seq_len - 1 + depth
        self.forwards += len(sizes) - 1
        return self.sm.run_captured(*self._expansion(sizes, branching))

    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(root logits [V], base [B]): the expansion's inputs, kept with the draft's static model and its graphs."""
        dev = self.engine.device
        return self.sm.buffer(("tree_inputs", self.vocab), lambda: (
            torch.zeros(self.vocab, dtype=torch.float32, device=dev), torch.zeros(self.sm.batch, dtype=torch.long,
                                                                                  device=dev)))

    def _expansion(self, sizes: list[int], branching: int):
        """(key, body, inputs) of the expansion for run_captured."""
        sm, (root_in, base_in) = self.sm, self._inputs()

        def level(tokens, depths, ancestors):
            st = sm.step(tokens.shape[0], tree=True)
            st.tokens.copy_(tokens[None])
            st.base.copy_(base_in)
            st.offsets.copy_(depths - 1)
            st.mask.copy_(ancestors)
            sm.run_inline(st)
            return fit_vocab(st.logits[0], self.vocab)

        key = ("tree", tuple(sizes), branching, self.vocab)
        return key, lambda: expand_tree(root_in, level, sizes, branching), (root_in, base_in)

    def prepare_levels(self, sizes: list[int], branching: int) -> None:
        """Capture the expansion before the decode timer."""
        self._inputs()[1].fill_(self.held)  # warm-up writes the node slots after the held tokens
        self.sm.run_captured(*self._expansion(sizes, branching), replay=False)


def accepted_path(target_argmax: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """Greedy walk. target_argmax: [N+1] over [root, nodes]; tokens, parents: [N]. Returns (node indices of the
    accepted path, the target's token after it)."""
    children: dict[int, dict[int, int]] = {}
    for i, (tok, par) in enumerate(zip(tokens, parents, strict=False)):
        children.setdefault(par + 1, {}).setdefault(tok, i)  # verify index: 0 = root, node i -> i + 1
    path, at = [], 0
    while (child := children.get(at, {}).get(target_argmax[at])) is not None:
        path.append(child)
        at = child + 1
    return path, target_argmax[at]


@register("decoder", "tree", TreeConfig)
class TreeSpeculative(DecoderStrategy):
    """Tree speculative decoding: a draft token tree verified in one target forward (greedy, lossless, batch 1)."""

    def __init__(self, cfg: TreeConfig, *, draft_engine=None):
        self.cfg = cfg
        self.draft = DraftEngineHolder(cfg.draft, draft_engine)
        self.sizes = level_sizes(cfg.depth, cfg.branching, cfg.width)
        self.keep_state: dict | None = None

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        c = self.cfg
        ids = prompt_ids.to(engine.device)
        batch, prompt_len = ids.shape
        if batch != 1:
            raise ValueError(f"decoder=tree decodes batch 1 (each row would need its own tree mask), got batch {batch}")
        device = engine.device
        path_kind = resolve_fast_path(c.fast_path, engine)
        draft = self.draft.get(engine)
        vocab = engine.config.vocab_size
        if path_kind == "eager":
            drafter = TreeDrafter(draft, vocab, Sampling())
        else:
            drafter = StaticTreeDrafter(draft, vocab, Sampling(), capture=path_kind == "graph")
        max_len = prompt_len + max(max_new_tokens, 1) + sum(self.sizes) + 2
        seq = torch.empty(1, max_len, dtype=torch.long, device=device)
        seq[:, :prompt_len] = ids
        out = EmittedTokens(1, max_new_tokens, eos_id)
        stats, clock = LoopStats(), Timer(device)
        nodes_total = levels_total = compaction_forwards = 0
        with torch.inference_mode():
            target = make_target(engine, 1, max_len, path_kind)
            with Timer(device) as prefill:
                if max_new_tokens > 0:
                    first = target.prefill(ids).argmax(-1)
                    stats.target_forwards = 1
                    drafter.start(ids, target, max_len, None)
                    seq[:, prompt_len] = first
                    out.extend([first.tolist()])
            seq_len = prompt_len + 1
            if not out.finished and path_kind != "eager":  # capture outside the timers
                target.prepare(sum(self.sizes) + 1, tree=True)
                drafter.prepare(catch_up=c.depth + 1)  # an accepted path of d nodes leaves d + 1 tokens to feed
                drafter.prepare_levels(self.sizes, c.branching)
            capture_before = target.capture_s + drafter.capture_s
            with Timer(device) as decode:
                while not out.finished:
                    clock.mark("draft")
                    # a static target keeps one block shape (one graph); eager trees shrink near the end
                    levels = c.depth if target.fixed_width else min(c.depth, out.remaining - 1)
                    root = seq[:, seq_len - 1 : seq_len]
                    if levels > 0:
                        tree = drafter.expand(seq, seq_len, self.sizes[:levels], c.branching)
                        n_nodes = tree.tokens.shape[0]
                        mask = torch.ones(n_nodes + 1, n_nodes + 1, dtype=torch.bool, device=device).tril_()
                        mask[1:, 1:] = tree.ancestors
                        block = torch.cat((root, tree.tokens[None]), dim=1)
                        offsets = torch.cat((tree.depths.new_zeros(1), tree.depths))
                    else:
                        tree, n_nodes, block, mask, offsets = None, 0, root, None, None
                    clock.mark("verify")
                    logits = target.verify(block, mask, offsets)
                    clock.mark("accept")
                    argmax = target.argmax(logits)[0]
                    if tree is None:
                        path, last, path_tokens = [], int(argmax[0]), []
                    else:
                        host = torch.cat((argmax, tree.tokens, tree.parents)).tolist()  # the one host sync
                        g, toks = host[: n_nodes + 1], host[n_nodes + 1 : 2 * n_nodes + 1]
                        pars = host[2 * n_nodes + 1 :]
                        path, last = accepted_path(g, toks, pars)
                        path_tokens = [toks[i] for i in path]
                    emitted = torch.tensor([path_tokens + [last]], dtype=torch.long, device=device)
                    if c.compaction == "gather":  # the root sits at slot seq_len - 1, node i at seq_len + i
                        target.keep_path(seq_len, torch.tensor(path, dtype=torch.long, device=device) + seq_len)
                    else:
                        target.commit(seq_len - 1)
                        target.verify(torch.cat((root, emitted[:, :-1]), dim=1))
                        compaction_forwards += 1
                    drafter.commit(seq_len)  # the draft holds the sequence up to the root; nodes were never kept
                    seq[:, seq_len : seq_len + len(path) + 1] = emitted
                    seq_len += len(path) + 1
                    out.extend([path_tokens + [last]])
                    stats.iterations += 1
                    stats.target_forwards += 1 + (c.compaction == "rerun")
                    stats.drafted += n_nodes
                    stats.accepted += len(path)
                    nodes_total += n_nodes
                    levels_total += levels
                clock.mark("end")
            capture_s = target.capture_s + drafter.capture_s - capture_before
            if self.keep_state is not None:
                self.keep_state.update(target=target, seq=seq[:, :seq_len], drafter=drafter)
        counters = speculation_counters(out, stats, prefill.seconds, decode.seconds - capture_s, clock.phases(),
                                        drafter)
        iters = max(stats.iterations, 1)
        counters.update(
            tree_nodes_mean=nodes_total / iters,
            accepted_per_level=stats.accepted / levels_total if levels_total else 0.0,
            compaction_forwards=int(compaction_forwards),
            depth=int(c.depth), branching=int(c.branching), width=int(c.width),
            graph_capture_s=capture_s, fast_path_graph=int(path_kind == "graph"),
            fast_path_static=int(path_kind != "eager"),
        )
        return Generation(out.result(device), counters)

    def close(self) -> None:
        self.draft.close()
