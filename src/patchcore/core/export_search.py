"""The exported graph's reduced-precision nearest-row searches with an exact float32 re-check:
``search="int8"`` (onnxruntime) and ``search="bfloat16"`` (OpenVINO) of
:func:`patchcore.core.export.export`.

:class:`Int8ScoringGraph` and :class:`Bf16ScoringGraph` are the
:class:`~patchcore.core.graph.ScoringGraph` with another ``patch_distances``; the backbone, the
embedding, the image score and the map are the graph's own. A custom torch op carries each
scan through the exporter (:func:`translation_table` maps it to standard ONNX ops); its eager
form does the deployed arithmetic.

**int8**, per batch of patches, the torch path's own int8 scan
(:class:`~patchcore.core.search.Int8Table`: one scale fixed at export, the bias ``|b|^2`` in extra
integer columns):

1. **int8 scan.** The centred patches are rounded to the table's scale and offset to uint8
   (``+ 128``), which ``MatMulInteger`` takes back off as its zero point: the exact int32
   products are the torch scan's. Per block of bank rows, the minimum of every chunk of
   :data:`~patchcore.core.search.INT8_CHUNK` columns (``ReduceMin``), the best chunk
   (``ArgMin``) and the best row within it (``GatherElements``, ``ArgMin``); blocks merge
   keeping the first on ties, so every patch gets the torch scan's row.
2. **Exact bound.** The float32 distance from each patch to the row the scan found: an upper
   bound of its nearest-row distance, equal to it whenever the scan found the nearest row.
3. **Re-check** (as :func:`patchcore.core.search.patch_scores` does after its scan):
   each image's ``2 top_k`` largest bounds are computed exactly (float32, the whole bank); the
   ``top_k``-th largest of those is a floor under the image's true ``top_k``-th largest distance;
   every other patch whose bound reaches the floor is computed exactly too. The patches left have
   true distance <= bound < floor, so each image's ``top_k`` largest distances, hence its score
   (and eq. 7's worst patch), are those of the float32 search.

Map values are the bounds (exact where re-checked), as the torch path's on CPUs with int8 dot
products (measured in benchmarks/RESULTS.md, "Export and runtime").

**bfloat16** is the torch path's own default search (:func:`patchcore.core.search.patch_scores`)
as a graph: ``[q, 1] [-2 b, |b|^2]^T`` in bfloat16 and its row minimum per block (ONNX
``MatMul`` -> ``ReduceMin``), ``|q|^2`` added in float32, the error bound from the row minima
(:func:`~patchcore.core.search.bf16_error`, allowing for outputs truncated to bfloat16 rather
than rounded), then the same re-check with error intervals. The
ONNX graph holds those products in float32 (onnxruntime runs it exactly);
:func:`bf16_products` puts them in bfloat16 in the OpenVINO model with explicit ``Convert``
nodes, so they run in bfloat16 under the runtime's ``f32`` precision hint, which keeps the
rest of the graph (backbone, re-check) in float32. OpenVINO's conversion to bfloat16 truncates
where torch's rounds to nearest, so the graph rounds ``q`` first (and the bank blocks are
rounded at export): the OpenVINO scan is the torch path's arithmetic. Map values are the scan's
estimates (exact where re-checked), as the torch path's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from patchcore.core.graph import ScoringGraph
from patchcore.core.search import INT8_CHUNK, Int8Table, bf16_error, first_minimum

if TYPE_CHECKING:
    from patchcore.core.detector import PatchCore

__all__ = [
    "BF16_SCAN",
    "Bf16ScoringGraph",
    "Int8ScoringGraph",
    "bf16_products",
    "bf16_scan_nodes",
    "translation_table",
]

#: The name of the bfloat16 scan's op: the exporter records it in the namespace of the ONNX
#: nodes it becomes, which is how :func:`bf16_scan_nodes` finds them.
BF16_SCAN = "patchcore.bf16_min_sq"


@torch.library.custom_op("patchcore::int8_scan_rows", mutates_args=())
def int8_scan_rows(coded: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, W) uint8 encoded patches (``round(q / s) + 128``, constant columns), (W, N) int8 a
    block of the table (N a multiple of ``INT8_CHUNK``) -> ((Q,) int32 the smallest value,
    (Q,) int64 its first column). Eager: the exported ops' arithmetic (exact integers)."""
    values = ((coded.long() - 128) @ table.long()).to(torch.int32)  # exact: |v| < 2^31
    return first_minimum(values)


@int8_scan_rows.register_fake
def _(coded: torch.Tensor, table: torch.Tensor) -> Any:
    n = coded.shape[0]
    return coded.new_empty(n, dtype=torch.int32), coded.new_empty(n, dtype=torch.int64)


@torch.library.custom_op("patchcore::bf16_min_sq", mutates_args=())
def bf16_min_sq(q_ext: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(Q, D + 1) ``[q, 1]``, (D + 1, M) ``[-2 b, |b|^2]^T`` (values bfloat16 holds) ->
    (Q,) approximate ``min |b|^2 - 2 q.b``. Eager: ``q`` rounded to bfloat16, the product in
    bfloat16 and its minimum, as the OpenVINO graph runs them after :func:`bf16_products` (and
    as the torch path's scan)."""
    return (q_ext.to(torch.bfloat16) @ block.to(torch.bfloat16)).amin(1).float()


@bf16_min_sq.register_fake
def _(q_ext: torch.Tensor, block: torch.Tensor) -> Any:
    return q_ext.new_empty(q_ext.shape[0])


#: columns per chunk minimum in the exported int8 scan (a divisor of ``INT8_CHUNK``)
_ONNX_CHUNK = 32


def _u8(value: int) -> Any:
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.uint8))


def translation_table() -> dict[Any, Any]:
    """The exporter's translation of the scans to standard ONNX ops."""
    from onnxscript import opset18 as op

    def int8_scan_rows_onnx(coded, table):  # noqa: ANN001, ANN202
        # the first minimum by chunks of _ONNX_CHUNK columns (any divisor of INT8_CHUNK finds
        # the same column): chunk minima (ReduceMin), the best chunk (ArgMin), its columns
        # picked with a flat Gather (onnxruntime's GatherElements is far slower), ArgMin
        values = op.MatMulInteger(coded, table, op.Constant(value=_u8(128)))  # (Q, N) int32
        n = op.Shape(coded, start=0, end=1)
        per = op.Div(op.Shape(table, start=1, end=2), op.Constant(value_ints=[_ONNX_CHUNK]))
        chunked = op.Reshape(
            values, op.Concat(n, per, op.Constant(value_ints=[_ONNX_CHUNK]), axis=0)
        )
        least = op.ReduceMin(chunked, op.Constant(value_ints=[2]), keepdims=0)  # (Q, C)
        best = op.ArgMin(least, axis=1, keepdims=0)  # (Q,), the first on ties
        rows = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
        flat = op.Reshape(values, op.Constant(value_ints=[-1, _ONNX_CHUNK]))  # (Q C, chunk)
        chunk = op.Gather(flat, op.Add(op.Mul(rows, op.Squeeze(per)), best), axis=0)
        within = op.ArgMin(chunk, axis=1, keepdims=0)
        value = op.ReduceMin(chunk, op.Constant(value_ints=[1]), keepdims=0)
        column = op.Add(op.Mul(best, op.Constant(value_int=_ONNX_CHUNK)), within)
        return value, column

    def bf16_min_sq_onnx(q_ext, block):  # noqa: ANN001, ANN202
        # q to bfloat16's 8 significant bits, rounded to nearest (Veltkamp's split with
        # 2^16 + 1), so that OpenVINO's conversion to bfloat16, which truncates, is exact
        t = op.Mul(q_ext, op.Constant(value_float=65537.0))
        q_rounded = op.Sub(t, op.Sub(t, q_ext))
        axes = op.Constant(value_ints=[1])
        return op.ReduceMin(op.MatMul(q_rounded, block), axes, keepdims=0)  # bf16_products

    return {
        torch.ops.patchcore.int8_scan_rows.default: int8_scan_rows_onnx,
        torch.ops.patchcore.bf16_min_sq.default: bf16_min_sq_onnx,
    }


def bf16_scan_nodes(onnx_path: Any) -> list[str]:
    """Names of the ``MatMul`` nodes of the bfloat16 scan in an exported ONNX graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul"
        and any(p.key == "namespace" and BF16_SCAN in p.value for p in n.metadata_props)
    ]


def bf16_products(model: Any, names: list[str]) -> int:
    """Put the ``MatMul`` nodes called ``names`` of an OpenVINO ``model``, each followed by its
    row minimum (``ReduceMin``), in bfloat16: inputs converted to bfloat16, product and minimum
    in bfloat16, the minimum converted back to float32. Returns how many it changed (a product
    feeding anything else is left as it is, so the caller's count check refuses it)."""
    import openvino as ov
    import openvino.opset13 as ops

    wanted, done = set(names), 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul" or node.get_friendly_name() not in wanted:
            continue
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        if len(users) != 1 or users[0].get_type_name() != "ReduceMin":
            continue
        least, attrs = users[0], node.get_attributes()
        product = ops.matmul(
            ops.convert(node.input_value(0), ov.Type.bf16),
            ops.convert(node.input_value(1), ov.Type.bf16),
            attrs["transpose_a"],
            attrs["transpose_b"],
        )
        low = ops.reduce_min(product, least.input_value(1), least.get_attributes()["keep_dims"])
        back = ops.convert(low, ov.Type.f32)
        for target in list(least.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
        done += 1
    model.validate_nodes_and_infer_types()
    return done


def _recheck(
    graph: ScoringGraph,
    flat: torch.Tensor,
    estimate: torch.Tensor,
    upper: torch.Tensor,
    shape: tuple[Any, Any],
) -> torch.Tensor:
    """The exact re-check (the module docstring) of a scan's squared distances.

    Args:
        flat: (B P, D) patches. estimate: (B P,) the scan's squared distances; upper: (B P,)
            an upper bound of each true squared distance. shape: (B, P).

    Returns:
        (B, P) distances: the estimates, exact for each image's ``top_k`` largest.
    """
    b, p = shape
    k = graph.top_k
    first = estimate.view(b, p).topk(torch.sym_min(2 * k, p), dim=1).indices
    first = (first + torch.arange(b).view(b, 1) * p).reshape(-1)
    exact1 = graph.min_sq(flat[first]).clamp(min=0.0)
    floor = exact1.view(b, -1).topk(k, dim=1).values[:, -1:]  # (B, 1) squared
    d2 = estimate.index_put((first,), exact1)
    reach = (upper.view(b, p) >= floor * (1 - 1e-6)).reshape(-1)
    reach = reach.index_put((first,), torch.zeros_like(first, dtype=torch.bool))
    second = reach.nonzero().squeeze(1)
    d2 = d2.index_put((second,), graph.min_sq(flat[second]).clamp(min=0.0))
    return d2.sqrt().view(b, p)


class Int8ScoringGraph(ScoringGraph):
    """:class:`~patchcore.core.graph.ScoringGraph` with the int8 scan and the exact re-check
    (see the module docstring); arguments as the graph's, ``scan_columns`` the table's
    columns per scan block (a multiple of ``INT8_CHUNK``)."""

    def __init__(
        self,
        det: PatchCore,
        size: tuple[int, int] | None,
        block_rows: int = 4096,
        scan_columns: int = 1024,
    ):
        super().__init__(det, size, block_rows=block_rows)
        centred = det.state_.memory_bank.detach().float().cpu() - self.bank_mean
        self.register_buffer("rows", centred.contiguous())  # (M, D): the exact bound's rows
        table = Int8Table(centred)
        self.scale, self.n_rows, self.dim = table.scale, table.rows, table.dim
        # the encoded patches' constant columns, offset by 128 as the codes are
        self.register_buffer("coded_tail", (table.constants.short() + 128).to(torch.uint8))
        step = -(-int(scan_columns) // INT8_CHUNK) * INT8_CHUNK
        self.scan_starts = list(range(0, table.table.shape[1], step))
        for i, lo in enumerate(self.scan_starts):
            block = table.table[:, lo : lo + step].contiguous()  # (W, N) int8
            self.register_buffer(f"int8_table{i}", block)

    def _scan(self, qc: torch.Tensor) -> torch.Tensor:
        """(Q, D) centred patches -> (Q,) the row the int8 scan finds nearest."""
        head = torch.round(qc / self.scale).clamp(-127.0, 127.0) + 128.0
        tail = self.coded_tail.expand(qc.shape[0], -1)
        coded = torch.cat([head.to(torch.uint8), tail], 1)
        best_v = best_col = None
        for i, lo in enumerate(self.scan_starts):
            v, col = torch.ops.patchcore.int8_scan_rows(coded, getattr(self, f"int8_table{i}"))
            col = col + lo
            if best_v is None:
                best_v, best_col = v, col
            else:
                better = v < best_v  # strict: the earlier block keeps a tie
                best_v = torch.where(better, v, best_v)
                best_col = torch.where(better, col, best_col)
        assert best_col is not None
        return best_col % self.n_rows  # padding columns repeat the first rows

    def patch_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P) distances, exact for each image's ``top_k`` largest."""
        b, p, d = patches.shape
        flat = patches.reshape(b * p, d)
        qc = flat - self.bank_mean
        bound = ((qc - self.rows[self._scan(qc)]) ** 2).sum(1)  # >= the nearest squared
        return _recheck(self, flat, bound, bound, (b, p))


class Bf16ScoringGraph(ScoringGraph):
    """:class:`~patchcore.core.graph.ScoringGraph` with the bfloat16 scan and its re-check
    (see the module docstring); arguments as the graph's."""

    def __init__(self, det: PatchCore, size: tuple[int, int] | None, block_rows: int = 4096):
        super().__init__(det, size, block_rows=block_rows)
        centred = det.state_.memory_bank.detach().float().cpu() - self.bank_mean
        self.max_norm = float(centred.norm(dim=1).max())
        for i in range(self.n_blocks):  # the scan's blocks, rounded to bfloat16 here (nearest)
            block = getattr(self, f"block{i}").to(torch.bfloat16).float()
            self.register_buffer(f"bf16_block{i}", block.contiguous())

    def patch_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P) distances, exact for each image's ``top_k`` largest."""
        b, p, d = patches.shape
        flat = patches.reshape(b * p, d)
        qc = flat - self.bank_mean
        qsq = (qc * qc).sum(1)
        q_ext = torch.cat([qc, torch.ones_like(qc[:, :1])], 1)
        best = None
        for i in range(self.n_blocks):
            part = torch.ops.patchcore.bf16_min_sq(q_ext, getattr(self, f"bf16_block{i}"))
            best = part if best is None else torch.minimum(best, part)
        assert best is not None
        d2 = (best + qsq).clamp(min=0.0)
        err = bf16_error(qsq, self.max_norm, d, best, truncated=True)  # best: the row minima
        return _recheck(self, flat, d2, d2 + err, (b, p))
