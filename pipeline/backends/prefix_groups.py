"""Which log-likelihood requests share a prefix, and how the suffixes after it are batched.

Requests are sorted by token sequence; those that share a prefix are grouped (`plan_groups`), so
the prefix runs once and its key/value cache is reused for each request's remaining tokens.
Suffixes after a prefix run as one packed row where that costs fewer FLOPs than padding every
suffix to the longest (MMLU's five questions per subject: a third of the padded positions were
padding), and as the trie of their tokens (`SuffixTrie`): a token shared with all the tokens
before it, as TruthfulQA's question is by each of its answers, runs once (40 TruthfulQA items:
2,903 positions after the preamble, not 8,053). `group_batches` lays a group's members out into
packed rows and stock's padded batches (`PackingCost` weighs the two).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

# A prefix shorter than this is not worth a separate forward pass.
MIN_SHARED = 32
# Most tokens in one packed row (its [tokens, prefix + tokens] mask is built whole).
PACK_TOKENS = 4096
# A packed row grows while the attention its tokens pay to each other's (masked) keys stays within
# this share of its linear work: the row's attention cost grows with the square of its length.
PACK_ATTENTION_SHARE = 0.25
# The forward argument that tells an attention function the trie of the packed row it runs
# (PrefixCachingHFLM passes it to attention that places keys per request, which cannot take the
# custom mask as it is; transformers hands a forward's extra arguments to the attention function).
PACKED_SUFFIXES = "packed_suffixes"


@dataclass(frozen=True)
class SuffixTrie:
    """Suffixes after a shared prefix as the trie of their tokens: a token that several suffixes
    share with all the tokens before it (TruthfulQA's question, read by each of its answers) is
    one node, run once. Nodes are numbered as the suffixes first reach them: the nodes suffix r
    reaches first are its last fresh[r] tokens, numbered right after those of suffixes 0..r-1."""

    tokens: torch.Tensor  # [nodes] token id
    depth: torch.Tensor  # [nodes] index in its suffix (position = prefix length + depth)
    paths: torch.Tensor  # [suffixes, longest] node of each suffix token, -1 past the suffix's end
    fresh: torch.Tensor  # [suffixes] how many of its nodes each suffix reaches first

    @classmethod
    def of(cls, suffixes: list[tuple]) -> SuffixTrie:
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        tokens, depth, paths, fresh = [], [], [], []
        for s in suffixes:
            parent, path, before = -1, [], len(tokens)
            for j, t in enumerate(s):
                node = index.setdefault((parent, t), len(tokens))
                if node == len(tokens):
                    tokens.append(t)
                    depth.append(j)
                path.append(node)
                parent = node
            paths.append(path)
            fresh.append(len(tokens) - before)
        grid = torch.full((len(paths), max(len(p) for p in paths)), -1, dtype=torch.long)
        for r, path in enumerate(paths):
            grid[r, : len(path)] = torch.tensor(path, dtype=torch.long)
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), grid, torch.tensor(fresh))

    @property
    def nodes(self) -> int:
        return len(self.tokens)

    def attends(self) -> torch.Tensor:
        """[nodes, nodes] bool: node i attends node j iff j is i or before it on i's suffix."""
        out = torch.zeros(self.nodes, self.nodes, dtype=torch.bool)
        for path in self.paths:
            path = path[path >= 0]
            out[path[:, None], path[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool).tril()
        return out

    @property
    def suffix_tokens(self) -> int:
        """The tokens of the suffixes it stands for."""
        return int((self.paths >= 0).sum())


@dataclass
class PackedCounts:
    """What the packed rows of an evaluation ran: rows, the suffixes in them, the trie nodes run and
    the suffix tokens those nodes stand for."""

    rows: int = 0
    suffixes: int = 0
    nodes: int = 0
    suffix_tokens: int = 0

    def add(self, trie: SuffixTrie) -> None:
        self.rows += 1
        self.suffixes += len(trie.paths)
        self.nodes += trie.nodes
        self.suffix_tokens += trie.suffix_tokens

    def since(self, before: PackedCounts) -> PackedCounts:
        """What was counted after `before` (a copy taken earlier)."""
        return PackedCounts(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))


def common_prefix(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_groups(seqs: list[tuple], starts: list[int], min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Split sequences into (prefix_length, member indices) groups.

    seqs[i] is a model input; positions >= starts[i] are the ones whose logits are needed, so a
    group's prefix never reaches past any member's start. Sequences are visited in sorted order,
    where a shared prefix makes them adjacent; a sequence joins the current group while the
    group keeps a prefix of at least `min_shared` tokens and at least half of what it had.
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            p, members = groups[-1]
            first = seqs[members[0]]
            joined = min(p, common_prefix(first, seqs[i]), starts[i])
            keep = min_shared if len(members) == 1 else max(min_shared, p // 2)
            if joined >= keep:
                groups[-1] = (joined, members + [i])
                continue
        groups.append((starts[i], [i]))
    # a group of one shares nothing: its "prefix" is just a split of its own sequence
    return [(p if len(m) > 1 else 0, m) for p, m in groups]


@dataclass(frozen=True)
class PackingCost:
    """A model's forward FLOPs per token (through its weights) and per query-key pair (QK^T, AV),
    which decide how suffixes are packed."""

    per_token: int
    per_pair: int

    @classmethod
    def of(cls, model) -> PackingCost:
        cfg = model.config.get_text_config()
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        embeddings = sum(p.numel() for p in model.get_input_embeddings().parameters())
        weights = sum(p.numel() for p in model.parameters()) - embeddings
        return cls(2 * weights, 4 * layers * heads * head_dim)

    def limit(self) -> int:
        """Most trie nodes in one packed row: every token of the row also meets the other suffixes'
        (masked) keys, which stays within PACK_ATTENTION_SHARE of its linear work; at most PACK_TOKENS."""
        return max(1, min(PACK_TOKENS, int(PACK_ATTENTION_SHARE * self.per_token / self.per_pair)))

    def pays(self, batches: list[list[int]], nodes: int, prefix_len: int) -> bool:
        """Whether one packed row of these suffixes (`nodes` distinct tokens) costs fewer FLOPs than
        the padded batches they would otherwise run (`batches`: each batch's suffix lengths): padding
        runs every row to its batch's longest suffix; packing runs each distinct token once, but each
        attends the other suffixes' keys too (masked, still computed)."""
        if sum(map(len, batches)) < 2 or nodes > PACK_TOKENS:
            return False
        per_token, per_pair = self.per_token, self.per_pair
        padded = sum(len(b) * max(b) * (per_token + (prefix_len + max(b)) * per_pair) for b in batches)
        return nodes * (per_token + (prefix_len + nodes) * per_pair) < padded


def group_batches(
    members: list[int], seqs: list[tuple], prefix_len: int, batch_size: int, packing: PackingCost | None
) -> Iterator[tuple[list[int], bool]]:
    """A group's forwards after its prefix, as (members, packed). Where packing is on (a cost is
    given), the members are taken in token order (plan_groups' order, in which suffixes sharing
    tokens are adjacent) into rows of at most `packing.limit()` trie nodes; a row runs packed where
    that costs fewer FLOPs than padding (`packing.pays`), else as the padded batches below. Padded
    batches are stock lm-eval's: batch_size requests, longest first."""

    def padded(batch: list[int]) -> Iterator[tuple[list[int], bool]]:
        batch = sorted(batch, key=lambda i: -len(seqs[i]))
        for b in range(0, len(batch), batch_size):
            yield batch[b : b + batch_size], False

    if packing is None or not prefix_len:
        yield from padded(members)
        return
    limit, row, nodes = packing.limit(), [], 0

    def flush() -> Iterator[tuple[list[int], bool]]:
        batches = list(padded(row))
        if packing.pays([[len(seqs[i]) - prefix_len for i in b] for b, _ in batches], nodes, prefix_len):
            yield row, True
        else:
            yield from batches

    for i in members:
        # in sorted order a suffix shares the most leading tokens with the one before it
        new = len(seqs[i]) - (common_prefix(seqs[row[-1]], seqs[i]) if row else prefix_len)
        if row and nodes + new > limit:
            yield from flush()
            row, nodes, new = [], 0, len(seqs[i]) - prefix_len
        row.append(i)
        nodes += new
    yield from flush()
