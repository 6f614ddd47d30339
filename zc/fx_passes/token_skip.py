"""token_skip: less important tokens skip the transformer blocks after block K.

Training-free, static shapes, no model edits. The pass works on Dynamo's torch-level graph,
where ``node.meta["nn_module_stack"]`` says which module each op came from:

1. **Block stack.** The repeated children of one ``ModuleList`` (``encoder.layer.0``,
   ``encoder.layer.1``, ...) are the blocks; the list with the most children wins.
2. **Region.** The ops of blocks ``K+1 .. N-1`` form the region. Its inputs from outside are the
   hidden state leaving block K (the only input that depends on the blocks before), tensors
   computed before the stack (attention masks, rotary cos/sin) and weights; its one output
   leaving the region is the last block's hidden state.
3. **Select.** After block K an importance score that needs no attention weights (SDPA kernels
   stay usable) ranks the tokens: cosine similarity of each token's hidden state to an anchor
   token (the first one for encoders and ViTs, the last one for causal LMs), or the hidden
   state's norm, or the opposite of the similarity (distinct tokens first: on the digits ViT the
   patches least like [CLS] carry the strokes). Padding tokens (read from the attention mask) score lowest, so they skip
   first; the first token (CLS / attention sink) and, for causal LMs, the last one are always
   kept. ``k = ceil(keep_ratio * S)`` indices are kept, sorted by position, so a causal mask
   restricted to them is still causal.
4. **Gather.** The hidden state and every sequence-indexed input of the region (the 4-D mask on
   its query and key dims, cos/sin on their position dim) are gathered to the kept tokens; the
   shapes baked into the region's ``view``/``reshape``/``expand`` calls are re-derived for ``k``
   tokens by propagating fake tensors through the region (and checked: every size that changed
   must be a multiple of the sequence length becoming the same multiple of ``k``).
5. **Scatter.** The region's output is scattered back into block K's output: skipped tokens
   keep their block-K state, so every output keeps its shape (mean pooling, per-token heads and
   LM logits keep working).

Everything happens inside the one graph handed on to Inductor: the top-k, gathers and scatter
are ATen ops Inductor fuses into its kernels (indirect loads / stores), not a Python loop.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from zc.config import TokenSkipConfig
from zc.fx_passes.pass_manager import PassReport, is_weight_input

# Runs on Dynamo's graph (see zc.dynamo_backend.backend): it needs the module structure.
GRAPH_LEVEL = "dynamo"

_INDEXED_PATH = re.compile(r"\[(\d+)\]")
_INDEX_IN_PATH = re.compile(r"\.(\d+)(?=\.|$)")
_RESHAPE_METHODS = ("view", "reshape")
_RESHAPE_FUNCTIONS = (torch.reshape,)
_SDPA = F.scaled_dot_product_attention


class SkipGraph(Exception):
    """The graph does not have the structure token_skip needs; the reason goes to the report."""


# --- ops the rewritten graph calls (traced into ATen by AOTAutograd, fused by Inductor) ------


def select_tokens(
    hidden: torch.Tensor,
    key_valid: torch.Tensor | None,
    keep: int,
    score: str,
    anchor: int,
    keep_last: bool,
) -> torch.Tensor:
    """Indices ``[B, keep]`` (ascending) of the tokens that go on through the later blocks."""
    if score == "norm":
        importance = hidden.float().norm(dim=-1)
    else:
        normed = F.normalize(hidden.float(), dim=-1)
        importance = (normed * normed[:, anchor : anchor + 1 if anchor >= 0 else None]).sum(-1)
        if score == "dissimilarity":
            importance = -importance
    # Scores are finite and bounded below by -|x| for norm, -1 for cosine: padding goes below.
    floor = -importance.abs().amax(dim=-1, keepdim=True) - 2.0
    if key_valid is not None:
        importance = torch.where(key_valid, importance, floor)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    special = positions == 0
    if keep_last:
        special = special | (positions == hidden.shape[1] - 1)
    ceiling = importance.abs().amax(dim=-1, keepdim=True) + 2.0
    importance = torch.where(special, ceiling, importance)
    kept = torch.topk(importance, keep, dim=1, sorted=False).indices
    return torch.sort(kept, dim=1).values


def outside_span(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices ``[B, S - (end - start)]`` of the tokens outside ``[start, end)`` (VTW: the image
    tokens of a multimodal LLM are withdrawn after block K)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    kept = torch.cat([positions[:start], positions[end:]])
    return kept.unsqueeze(0).expand(hidden.shape[0], -1)


def key_valid_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: which key positions the last query row of a 4-D attention mask may attend."""
    row = mask[:, 0, -1, :]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def gather_tokens(value: torch.Tensor, index: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``value`` restricted to the kept tokens ``index [B, k]`` along each of ``dims``.

    A size-1 batch dim (tensors shared by the batch, like rotary cos/sin) is broadcast first.
    """
    batch, keep = index.shape
    if value.shape[0] != batch:
        value = value.expand(batch, *value.shape[1:])
    for dim in dims:
        shape = [1] * value.dim()
        shape[0], shape[dim] = batch, keep
        target = list(value.shape)
        target[dim] = keep
        value = torch.gather(value, dim, index.view(shape).expand(target))
    return value


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``base [B, S, D]`` with the rows ``index`` replaced by ``kept [B, k, D]``."""
    return torch.scatter(base, 1, index.unsqueeze(-1).expand(kept.shape), kept)


def assign_to_kept(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, S]``: for every token, the kept token (0..k-1) its hidden state is most similar to."""
    normed = F.normalize(hidden.float(), dim=-1)
    kept = torch.gather(normed, 1, index.unsqueeze(-1).expand(*index.shape, normed.shape[-1]))
    assign = torch.bmm(normed, kept.transpose(1, 2)).argmax(dim=-1)
    # A kept token stands for itself even where another kept token is as similar.
    return torch.scatter(assign, 1, index, torch.arange(index.shape[1], device=index.device).expand(index.shape))


def merge_tokens(hidden: torch.Tensor, assign: torch.Tensor, key_valid: torch.Tensor | None, keep: int) -> torch.Tensor:
    """``[B, k, D]``: each kept token's state averaged with the (non-padding) tokens assigned to it."""
    weight = torch.ones_like(assign, dtype=hidden.dtype) if key_valid is None else key_valid.to(hidden.dtype)
    batch, _, dim = hidden.shape
    summed = hidden.new_zeros(batch, keep, dim).scatter_add(
        1, assign.unsqueeze(-1).expand(hidden.shape), hidden * weight.unsqueeze(-1))
    count = weight.new_zeros(batch, keep).scatter_add(1, assign, weight)
    return summed / count.clamp_min(1).unsqueeze(-1)


def unmerge_tokens(
    base: torch.Tensor, assign: torch.Tensor, kept: torch.Tensor, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """``[B, S, D]``: every token takes the output of the kept token it was merged into
    (padding tokens keep ``base``, their state from block K)."""
    out = torch.gather(kept, 1, assign.unsqueeze(-1).expand(base.shape))
    return out if key_valid is None else torch.where(key_valid.unsqueeze(-1), out, base)


# --- finding the block stack and the region ------------------------------------------------


def block_stack(gm: torch.fx.GraphModule) -> tuple[str, dict[torch.fx.Node, int]]:
    """The module path of the repeated blocks and the block index of every op inside one.

    Blocks are the children ``prefix.0``, ``prefix.1``, ... of one module list, all of one class
    and each running several ops (a ``Sequential`` of single layers is no block stack); the list
    with the most such children wins.
    """
    children: dict[str, dict[int, set[str]]] = {}
    paths: dict[torch.fx.Node, list[str]] = {}
    ops: dict[str, int] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op not in ("call_function", "call_method", "call_module"):
            continue
        node_paths = [_INDEXED_PATH.sub(r".\1", path) for path, _ in stack.values()]
        paths[node] = node_paths
        for path, (_, module_type) in zip(node_paths, stack.values()):
            for match in _INDEX_IN_PATH.finditer(path):
                if match.end() == len(path):  # the entry of the child module itself
                    types = children.setdefault(path[: match.start()], {}).setdefault(int(match.group(1)), set())
                    types.add(getattr(module_type, "__qualname__", str(module_type)))
                    ops[path] = ops.get(path, 0) + 1
    stacks = {
        prefix: blocks for prefix, blocks in children.items()
        if len(blocks) >= 2 and len(set().union(*blocks.values())) == 1
        and all(ops[f"{prefix}.{i}"] >= 2 for i in blocks)
    }
    if not stacks:
        raise SkipGraph("no stack of repeated blocks (a module list with 2+ children of one class) in the graph")
    prefix = max(stacks, key=lambda p: (len(stacks[p]), -len(p)))
    block_of = {}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?=\.|$)")
    for node, node_paths in paths.items():
        for path in node_paths:
            match = pattern.match(path)
            if match:
                block_of[node] = int(match.group(1))
                break
    return prefix, block_of


def _tensor(node: Any) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


def skip_region(gm: torch.fx.GraphModule, block_of: dict[torch.fx.Node, int], start_layer: int) -> list[torch.fx.Node]:
    """The ops of the blocks after ``start_layer`` (in graph order), plus glue ops between them."""
    nodes = list(gm.graph.nodes)
    later = [i for i, n in enumerate(nodes) if block_of.get(n, -1) > start_layer]
    first, last = later[0], later[-1]
    region: list[torch.fx.Node] = []
    members: set[torch.fx.Node] = set()
    for node in nodes[first : last + 1]:
        block = block_of.get(node)
        if block is not None and block <= start_layer:
            raise SkipGraph(f"op '{node.name}' of block {block} runs between the ops of later blocks")
        if block is not None or (node.op in ("call_function", "call_method")
                                 and any(i in members for i in _input_nodes(node))):
            region.append(node)
            members.add(node)
    return region


# --- rewriting -------------------------------------------------------------------------------


def _fake_run(node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    def value(arg: Any) -> Any:
        return arg.meta["example_value"] if isinstance(arg, torch.fx.Node) else arg

    args = torch.fx.node.map_aggregate(args, value)
    kwargs = torch.fx.node.map_aggregate(kwargs, value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _reshaped(old_in: Sequence[int], new_in: Sequence[int], old_out: Sequence[int], seq: int) -> list[int]:
    """The output shape of a view/reshape whose input shape went from ``old_in`` to ``new_in``.

    Input and output dims are matched in groups of equal element count (as a view does); a group
    whose count changed puts the change on its single output dim, or, when it splits, on the
    output dim that had the sequence length (the last such one: batch comes before sequence).
    """
    out = list(old_out)
    i = j = 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [i], [j]
        pi = old_in[i] if i < len(old_in) else 1
        pj = old_out[j] if j < len(old_out) else 1
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= old_in[i]
            else:
                j += 1
                gj.append(j)
                pj *= old_out[j]
        gi = [d for d in gi if d < len(old_in)]
        gj = [d for d in gj if d < len(old_out)]
        new_count = math.prod(new_in[d] for d in gi)
        if new_count != pi:
            if len(gj) == 1:
                out[gj[0]] = new_count
            else:
                candidates = [d for d in gj if old_out[d] == seq]
                if not candidates:
                    raise SkipGraph(f"cannot tell which dim of a view to {tuple(old_out)} holds the tokens")
                out[candidates[-1]] = old_out[candidates[-1]] * new_count // pi
        i += 1
        j += 1
    return out


def _rewrite_sizes(node: torch.fx.Node, seq: int) -> None:
    """Re-derive the sizes baked into a view/reshape/expand of a tensor that now has ``k`` tokens."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
    is_expand = node.op == "call_method" and node.target == "expand"
    if not (is_reshape or is_expand):
        return
    source = node.args[0]
    new_in = _tensor(source)
    old_in = node.meta["zc_old_input_shape"]
    if new_in is None or tuple(new_in.shape) == tuple(old_in):
        return
    old_out = tuple(node.meta["example_value"].shape)
    if is_reshape:
        new_out = _reshaped(old_in, tuple(new_in.shape), old_out, seq)
    else:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        offset = len(sizes) - new_in.dim()
        new_out = [
            size if size == -1 or i < offset or old_in[i - offset] == new_in.shape[i - offset]
            else new_in.shape[i - offset]
            for i, size in enumerate(sizes)
        ]
    node.args = (source, tuple(new_out))


def _check_shape(node: torch.fx.Node, old: torch.Size, new: torch.Size, seq: int, keep: int, batch: int) -> None:
    """Every size that changed must be the token count (or a multiple) now counting kept tokens,
    or a leading batch dim of a tensor the batch shared (rotary cos/sin), now gathered per row."""
    if len(old) != len(new):
        raise SkipGraph(f"op '{node.name}' changed rank with fewer tokens")
    for dim, (o, n) in enumerate(zip(old, new)):
        if o != n and not (o % seq == 0 and n == o // seq * keep) and not (dim == 0 and o == 1 and n == batch):
            raise SkipGraph(f"op '{node.name}' has shape {tuple(new)} with fewer tokens (was {tuple(old)}): "
                            "a size there is not the token count")


def rewrite(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    report: PassReport,
) -> torch.fx.GraphModule:
    """``gm`` rewritten in place so that blocks after ``start_layer`` see only the kept tokens."""
    prefix, block_of = block_stack(gm)
    blocks = sorted(set(block_of.values()))
    report.metrics["blocks"] = len(blocks)
    report.metrics["block_stack"] = prefix
    if config.start_layer > len(blocks) - 2:
        raise ValueError(
            f"zc: option 'token_skip.start_layer' must be in 0..{len(blocks) - 2} for this model's "
            f"{len(blocks)} blocks ('{prefix}'), so that at least one block runs on fewer tokens; "
            f"got {config.start_layer}"
        )
    start = config.start_layer
    region = skip_region(gm, block_of, start)
    members = set(region)

    # The hidden state from block K: the one input of the region computed by the earlier blocks.
    earlier = {n for n, b in block_of.items() if b <= start}
    depends_on_blocks: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node in members:
            break
        if node in earlier or any(i in depends_on_blocks for i in _input_nodes(node)):
            depends_on_blocks.add(node)
    externals = list(dict.fromkeys(i for n in region for i in _input_nodes(n) if i not in members))
    carried = [n for n in externals if n in depends_on_blocks]
    if len(carried) != 1:
        raise SkipGraph(f"the later blocks read {len(carried)} values computed by the earlier ones "
                        f"({', '.join(n.name for n in carried)}); token_skip needs exactly one hidden state")
    hidden_node = carried[0]
    hidden = _tensor(hidden_node)
    if hidden is None or hidden.dim() != 3:
        raise SkipGraph(f"the value '{hidden_node.name}' leaving block {start} is not a [batch, tokens, dim] tensor")
    batch, seq, _ = hidden.shape
    if any(isinstance(s, torch.SymInt) for s in hidden.shape):
        raise SkipGraph("the token count is symbolic (dynamic shapes); token_skip needs a static one")
    if config.withdraw_start is not None:
        span = (config.withdraw_start, min(config.withdraw_end, seq))
        keep = seq - max(0, span[1] - span[0])
        if keep >= seq:
            raise _Unchanged(f"the withdrawn span starts at {span[0]}, past the {seq} tokens: the graph runs unchanged")
    else:
        keep = math.ceil(config.keep_ratio * seq)
        if keep >= seq:
            raise _Unchanged(f"keep_ratio {config.keep_ratio} keeps all {seq} tokens: the graph runs unchanged")
    report.metrics.update(tokens=seq, kept_tokens=keep, start_layer=start)

    outputs = [n for n in region if any(u not in members for u in n.users)]
    if len(outputs) != 1 or _tensor(outputs[0]) is None or tuple(_tensor(outputs[0]).shape) != tuple(hidden.shape):
        raise SkipGraph(f"the later blocks hand {len(outputs)} values on ({', '.join(n.name for n in outputs)}); "
                        "token_skip needs exactly one hidden state of the input's shape")
    final = outputs[0]

    # Which inputs carry the token dim, and where.
    weights = _weight_nodes(gm, example_inputs)
    token_dims: dict[torch.fx.Node, list[int]] = {}
    masks = []
    for node in externals:
        value = _tensor(node)
        if node is hidden_node or value is None or node in weights or seq not in value.shape:
            continue
        if value.dim() == 4 and value.shape[-1] == seq:
            token_dims[node] = [d for d in (2, 3) if value.shape[d] == seq]
            masks.append(node)
        elif value.dim() in (2, 3) and value.shape[1] == seq and value.shape[0] in (1, batch):
            token_dims[node] = [1]
        else:
            raise SkipGraph(f"the later blocks read '{node.name}' of shape {tuple(value.shape)}, "
                            "whose token dim token_skip cannot tell")
    for node in masks:
        if not any(_is_mask_of_attention(user, node) for user in node.users if user in members):
            raise SkipGraph(f"the later blocks read '{node.name}' of shape {tuple(_tensor(node).shape)}, "
                            "which is not an attention mask")

    fake_mode = hidden.fake_mode  # the example values' own mode (the backend may run under another)
    anchor = _anchor(gm, region, config)
    graph = gm.graph
    with graph.inserting_before(region[0]), fake_mode:
        key_valid = None
        if masks:
            key_valid = graph.call_function(key_valid_from_mask, (masks[0],))
            key_valid.meta["example_value"] = key_valid_from_mask(_tensor(masks[0]))
        if config.withdraw_start is not None:
            index = graph.call_function(outside_span, (hidden_node, *span))
            index.meta["example_value"] = outside_span(hidden, *span)
        else:
            selection = (keep, config.score, anchor, anchor == -1)
            index = graph.call_function(select_tokens, (hidden_node, key_valid, *selection))
            index.meta["example_value"] = select_tokens(hidden, _value(key_valid), *selection)
        replacements = {}
        if config.strategy == "merge":
            assign = graph.call_function(assign_to_kept, (hidden_node, index))
            assign.meta["example_value"] = assign_to_kept(hidden, index.meta["example_value"])
            merged = graph.call_function(merge_tokens, (hidden_node, assign, key_valid, keep))
            merged.meta["example_value"] = merge_tokens(
                hidden, assign.meta["example_value"], _value(key_valid), keep)
            replacements[hidden_node] = merged
        for node, dims in [(hidden_node, [1]), *token_dims.items()]:
            if node in replacements:
                continue
            gathered = graph.call_function(gather_tokens, (node, index, dims))
            gathered.meta["example_value"] = gather_tokens(_tensor(node), index.meta["example_value"], dims)
            replacements[node] = gathered
    for node in region:
        node.meta["zc_old_input_shape"] = (
            tuple(_tensor(node.args[0]).shape) if node.args and _tensor(node.args[0]) is not None else None)
        node.args = torch.fx.node.map_arg(node.args, lambda n: replacements.get(n, n))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: replacements.get(n, n))
    with fake_mode:
        for node in region:
            old = node.meta["example_value"]
            _rewrite_sizes(node, seq)
            try:
                new = _fake_run(node, node.args, node.kwargs)
            except Exception as error:
                raise SkipGraph(f"op '{node.name}' does not run on fewer tokens: {type(error).__name__}: {error}") from error
            for o, n in zip(_tensors_of(old), _tensors_of(new)):
                _check_shape(node, o.shape, n.shape, seq, keep, batch)
            node.meta["example_value"] = new
            del node.meta["zc_old_input_shape"]
    users = [u for u in final.users if u not in members]
    with graph.inserting_after(final), fake_mode:
        if config.strategy == "merge":
            scattered = graph.call_function(unmerge_tokens, (hidden_node, assign, final, key_valid))
            scattered.meta["example_value"] = unmerge_tokens(
                hidden, assign.meta["example_value"], final.meta["example_value"], _value(key_valid))
        else:
            scattered = graph.call_function(scatter_tokens, (hidden_node, index, final))
            scattered.meta["example_value"] = scatter_tokens(
                hidden, index.meta["example_value"], final.meta["example_value"])
    for user in users:
        user.replace_input_with(final, scattered)
    graph.lint()
    gm.recompile()
    chosen = (f"tokens outside [{span[0]}, {span[1]}) (withdrawn span)" if config.withdraw_start is not None
              else f"score {config.score}")
    report.rewrote(
        f"{prefix}.{start + 1}..{blocks[-1]}",
        f"{keep} of {seq} tokens ({config.strategy}, {chosen}, anchor {'last' if anchor == -1 else 'first'}"
        f"{', padding-aware' if masks else ''}) run blocks {start + 1}..{blocks[-1]}; the rest keep "
        f"their state from block {start}",
    )
    return gm


class _Unchanged(Exception):
    """The options leave every token in place: the graph runs as captured."""


def _value(node: torch.fx.Node | None) -> Any:
    return None if node is None else node.meta["example_value"]


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _is_mask_of_attention(user: torch.fx.Node, mask: torch.fx.Node) -> bool:
    """``mask`` reaches an attention op as its mask (directly or through view-like glue)."""
    seen = {user}
    frontier = [user]
    while frontier:
        node = frontier.pop()
        if node.target is _SDPA:
            return node.kwargs.get("attn_mask") is not None or len(node.args) > 3
        if node.op == "call_method" or node.target in (operator.getitem, torch.Tensor.to):
            for nxt in node.users:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        elif node.op == "call_function":
            # eager attention adds the mask to the scores before a softmax
            return node.target in (operator.add, torch.add)
    return False


def _weight_nodes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set[torch.fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {n for n in gm.graph.nodes if n.op == "get_attr"}
    if len(placeholders) == len(example_inputs):
        weights |= {n for n, x in zip(placeholders, example_inputs) if is_weight_input(x)}
    return weights


def _anchor(gm: torch.fx.GraphModule, region: list[torch.fx.Node], config: TokenSkipConfig) -> int:
    """The token the others are compared with: the first (CLS) or, for causal LMs, the last.

    ``auto`` takes a model as causal when an attention op of the region is causal or a module
    it runs in is a decoder / causal-LM class (``LlamaDecoderLayer``, ``GPT2LMHeadModel``).
    """
    if config.anchor != "auto":
        return 0 if config.anchor == "first" else -1
    if any(n.target is _SDPA and n.kwargs.get("is_causal") for n in region):
        return -1
    causal_words = ("Decoder", "CausalLM", "LMHead")
    for node in region:
        for _, module_type in node.meta.get("nn_module_stack", {}).values():
            name = getattr(module_type, "__name__", str(module_type))
            if any(word in name for word in causal_words):
                return -1
    return 0


def prepare(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TokenSkipConfig,
    compile_rest: Callable[..., Callable[..., Any]],
    report: PassReport,
    on_rewritten: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any] | None:
    """The compiled graph with token skipping, or ``None`` (graph compiles unchanged) with the reason."""
    # A copy sharing the example values (fake tensors of Dynamo's fake mode), which the rewrite
    # replaces rather than mutates; a deep copy would give them a fake mode of their own.
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    rewritten = torch.fx.GraphModule(gm, graph)
    try:
        rewrite(rewritten, example_inputs, config, report)
    except _Unchanged as reason:
        report.status = "unchanged"
        report.skipped("graph", str(reason))
        return None
    except SkipGraph as reason:
        report.status = "skipped"
        report.skipped("graph", str(reason))
        return None
    on_rewritten(rewritten)
    return compile_rest(rewritten)
