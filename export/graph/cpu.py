"""Lower the canonical model to an ONNX decoder graph for ONNX Runtime's CPU provider.

Inputs:  input_ids int64 [B, S], position_ids int64 [B, S],
         past_key_values.{i}.key / .value float32 [B, P, KV, D]   (the cache so far)
Outputs: logits float32 [B, S, V],
         new_key_values.{i}.key / .value float32 [B, S, KV, D]    (this call's slice only)
The cache holds positions 0..P-1 in order; query s sees cache slots j <= position_ids[s].
Position-major KV ([T, KV, D] per layer) makes both the valid prefix and the next slice
contiguous in one preallocated buffer, so the runtime binds `past` to buffer[:, :P] and the
new slice straight to buffer[:, P:P+S]: the cache is written in place, never reallocated.

Matrices run through com.microsoft.MatMulNBits on the block layout the bundle stores; the
embedding lookup gathers rows of the same quantized table (one copy for a tied head) and
dequantizes them with standard ops. RoPE and grouped-query attention use standard ops only.
Initializer names are the checkpoint's tensor names plus a role suffix; node names are module
paths, so every node traces back to a tensor.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.bundle.architectures import EMBED, FINAL_NORM, LM_HEAD, layer_module, layer_weight
from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.model_config import ModelConfig
from edgellm.bundle.quant_formats import QUANT_FORMATS
from edgellm.export.quant.formats import BlockQuantTensor

TRACE_KEY = "edgellm.trace"  # model metadata: the reference's trace names -> the graph's value names

OPSET = 21
MS_DOMAIN = "com.microsoft"


def node_path(module: str) -> str:
    """The node path of a checkpoint module: "model.layers.3.self_attn.q_proj" -> "/model/layers.3/self_attn/q_proj"."""
    return "/" + re.sub(r"\.(?!\d)", "/", module)


def quant_initializers(name: str, tensor: BlockQuantTensor) -> dict[str, np.ndarray]:
    """The arrays stored for one quantized matrix, keyed by initializer name."""
    arrays = {f"{name}.qweight": tensor.packed_codes(), f"{name}.scales": np.ascontiguousarray(tensor.scales)}
    if tensor.mins is not None:
        arrays[f"{name}.mins"] = np.ascontiguousarray(tensor.mins)
    return arrays


class DecoderGraphBuilder:
    """Base builder for llama-family decoders; families override only what differs."""

    # ONNX Runtime's fused contrib op, its variance kept in float32 (stash_type 1) as the reference does
    RMS_NORM = ("SimplifiedLayerNormalization", {"stash_type": 1})

    def __init__(self, config: ModelConfig, tensors: dict, accuracy_level: int = 0):
        # accuracy_level 0: MatMulNBits in fp32. Level 4 (int8 activations) measured NMSE ~7e-3
        # on SmolLM2's logits, far noisier than llama.cpp's Q8_1 activations, so it is not offered.
        self.c = config
        self.tensors = tensors
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}  # initializers, in the order they are first used
        self._block_sums: dict[tuple[str, int], str] = {}  # (activation, block) -> [B,S,n_blocks]
        self._float32: dict[str, str] = {}  # float16 initializer -> its Cast to float32
        self.trace_points: dict[str, str] = {}  # the reference's trace names -> value names (TRACE_KEY)

    # -- small helpers --------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    def const(self, name: str, value) -> str:
        if name not in self.arrays:
            self.arrays[name] = np.asarray(value)
        return name

    def as_float32(self, name: str) -> str:
        """A float16 initializer (block scales, mins: weights.bin stores them as GGUF does) as float32,
        through one Cast that ONNX Runtime folds into a constant at load; the graph's math is float32."""
        if name not in self._float32:
            self._float32[name] = self.op("Cast", [name], f"/float32/{name}", to=TensorProto.FLOAT)
        return self._float32[name]

    def weight(self, name: str) -> str:
        return self.const(name, np.asarray(self.tensors[name], np.float32))

    # -- building blocks --------------------------------------------------------------------
    def make_matmul(self, x: str, name: str, path: str) -> str:
        """x [B,S,K] @ W.T for a block-quantized W [N,K]."""
        t: BlockQuantTensor = self.tensors[name]
        self.const(f"{name}.qweight", t.packed_codes())
        self.const(f"{name}.scales", np.ascontiguousarray(t.scales))
        inputs = [x, f"{name}.qweight", self.as_float32(f"{name}.scales")]
        if t.mins is not None:  # codes*scale + min: integer zero point 0 here, the min term below
            zero = np.zeros(t.rows * -(-t.n_blocks * t.bits // 8), np.uint8)
            inputs.append(self.const(f"const.zero_points.u{t.bits}.{t.rows}x{t.n_blocks}", zero))
        if t.bits == 8:
            return self.make_int8_matmul(x, name, t, path)
        y = self.op(
            "MatMulNBits",
            inputs,
            f"{path}/MatMulNBits",
            domain=MS_DOMAIN,
            K=t.cols,
            N=t.rows,
            bits=t.bits,
            block_size=t.block,
            accuracy_level=self.accuracy_level,
        )
        if t.mins is None:
            return y
        self.const(f"{name}.mins", np.ascontiguousarray(t.mins))
        mins_t = self.op(
            "Transpose", [self.as_float32(f"{name}.mins")], f"{path}/mins_T", perm=[1, 0]
        )  # [n_blocks, N], folded at load
        min_term = self.op("MatMul", [self.block_sums(x, t), mins_t], f"{path}/MatMul_mins")
        return self.op("Add", [y, min_term], f"{path}/Add_mins")

    def make_int8_matmul(self, x: str, name: str, t: BlockQuantTensor, path: str) -> str:
        """int8 codes c as two 4-bit halves: (c - 128)*d = 16d*hi + d*lo - 128d.

        ONNX Runtime's MatMulNBits has a fast fp32 kernel for 4 bits but not for 8 (there 8 bits
        is fast only with int8 activations, which cost accuracy), so the stored int8 codes are
        split into nibble planes by ops ONNX Runtime folds into constants at load.
        """
        codes = f"{name}.qweight"  # uint8 [N, n_blocks, block]
        scales = self.as_float32(f"{name}.scales")
        u8 = lambda v, tag: self.const(f"const.u8.{tag}", np.array(v, np.uint8))  # noqa: E731
        planes = {
            "lo": self.op("BitwiseAnd", [codes, u8(15, "15")], f"{path}/lo"),
            "hi": self.op("BitShift", [codes, u8(4, "4")], f"{path}/hi", direction="RIGHT"),
        }
        starts = {parity: self.const(f"const.i64.start{parity}", np.array([parity], np.int64)) for parity in (0, 1)}
        end = self.const("const.i64.end", np.array([t.block], np.int64))
        axis = self.const("const.axes.-1", np.array([-1], np.int64))
        step = self.const("const.i64.step2", np.array([2], np.int64))
        zero = self.const(
            f"const.zero_points.u4.{t.rows}x{t.n_blocks}", np.zeros(t.rows * -(-t.n_blocks // 2), np.uint8)
        )
        scale16 = self.op("Mul", [scales, self.const("const.f32.16", np.array(16, np.float32))], f"{path}/scale16")
        terms = []
        for plane, scale in (("hi", scale16), ("lo", scales)):
            even = self.op("Slice", [planes[plane], starts[0], end, axis, step], f"{path}/{plane}_even")
            odd = self.op("Slice", [planes[plane], starts[1], end, axis, step], f"{path}/{plane}_odd")
            packed = self.op(
                "BitwiseOr",
                [even, self.op("BitShift", [odd, u8(4, "4")], f"{path}/{plane}_odd_shift", direction="LEFT")],
                f"{path}/{plane}_pack",
            )
            terms.append(
                self.op(
                    "MatMulNBits",
                    [x, packed, scale, zero],
                    f"{path}/MatMulNBits_{plane}",
                    domain=MS_DOMAIN,
                    K=t.cols,
                    N=t.rows,
                    bits=4,
                    block_size=t.block,
                    accuracy_level=self.accuracy_level,
                )
            )
        scales_t = self.op(
            "Transpose",
            [self.op("Mul", [scales, self.const("const.f32.128", np.array(128, np.float32))], f"{path}/scale128")],
            f"{path}/scale128_T",
            perm=[1, 0],
        )
        offset = self.op("MatMul", [self.block_sums(x, t), scales_t], f"{path}/MatMul_offset")
        return self.op("Sub", [self.op("Add", terms, f"{path}/Add_planes"), offset], f"{path}/Sub_offset")

    def block_sums(self, x: str, t: BlockQuantTensor) -> str:
        """[B,S,n_blocks]: sums of x over each quant block (shared by matrices reading the same x)."""
        key = (x, t.block)
        if key not in self._block_sums:
            path = f"{x.rsplit('/', 1)[0]}/block_sums{t.block}"
            padded = x
            if t.n_blocks * t.block != t.cols:
                pads = np.array([0, 0, 0, 0, 0, t.n_blocks * t.block - t.cols], np.int64)
                padded = self.op("Pad", [x, self.const(f"{path}.pads", pads)], f"{path}/Pad")
            blocks = self.op(
                "Reshape",
                [
                    padded,
                    self.const(
                        f"const.shape.blocks{t.n_blocks}x{t.block}", np.array([0, 0, t.n_blocks, t.block], np.int64)
                    ),
                ],
                f"{path}/Reshape",
            )
            self._block_sums[key] = self.op(
                "ReduceSum",
                [blocks, self.const("const.axes.-1", np.array([-1], np.int64))],
                f"{path}/ReduceSum",
                keepdims=0,
            )
        return self._block_sums[key]

    def make_linear(self, x: str, prefix: str, path: str, bias: bool = False) -> str:
        y = self.make_matmul(x, f"{prefix}.weight", path)
        if bias:
            y = self.op("Add", [y, self.weight(f"{prefix}.bias")], f"{path}/Add")
        return y

    def make_rms_norm(self, x: str, name: str, path: str) -> str:
        op, attrs = self.RMS_NORM
        return self.op(op, [x, self.weight(name)], f"{path}/{op}", axis=-1, epsilon=float(self.c.rms_norm_eps), **attrs)

    def make_embedding(self, ids: str) -> str:
        name, path = f"{EMBED}.weight", node_path(EMBED)
        t: BlockQuantTensor = self.tensors[name]
        for key, value in quant_initializers(name, t).items():
            self.const(key, value)
        packed = self.op("Gather", [f"{name}.qweight", ids], f"{path}/Gather_qweight", axis=0)  # [B,S,nb,blob]
        if t.bits == 4:
            low = self.op("BitwiseAnd", [packed, self.const("const.u8.15", np.array(15, np.uint8))], f"{path}/low")
            high = self.op(
                "BitShift", [packed, self.const("const.u8.4", np.array(4, np.uint8))], f"{path}/high", direction="RIGHT"
            )
            axis = self.const("const.axes.-1", np.array([-1], np.int64))
            pair = self.op(
                "Concat",
                [
                    self.op("Unsqueeze", [low, axis], f"{path}/low_u"),
                    self.op("Unsqueeze", [high, axis], f"{path}/high_u"),
                ],
                f"{path}/interleave",
                axis=-1,
            )  # [B,S,nb,blob,2]: code 2k, code 2k+1
            packed = self.op(
                "Reshape", [pair, self.const(f"{path}.codes_shape", np.array([0, 0, 0, -1], np.int64))], f"{path}/codes"
            )
        codes = self.op("Cast", [packed], f"{path}/Cast", to=TensorProto.FLOAT)  # [B,S,nb,block]
        axis = self.const("const.axes.-1", np.array([-1], np.int64))

        def rows_float32(part: str) -> str:  # the looked-up rows' float16 scales or mins, as float32 [B,S,nb,1]
            rows = self.op("Gather", [f"{name}.{part}", ids], f"{path}/Gather_{part}", axis=0)
            return self.op(
                "Unsqueeze",
                [self.op("Cast", [rows], f"{path}/Cast_{part}", to=TensorProto.FLOAT), axis],
                f"{path}/{part}_u",
            )

        scales = rows_float32("scales")
        if t.mins is not None:  # codes*scale + min
            mins = rows_float32("mins")
            values = self.op("Add", [self.op("Mul", [codes, scales], f"{path}/Mul"), mins], f"{path}/Add")
        else:  # (codes - implied zero point) * scale
            zero_point = QUANT_FORMATS[t.format].zero_point
            zp = self.const(f"const.f32.zp{zero_point}", np.array(zero_point, np.float32))
            values = self.op("Mul", [self.op("Sub", [codes, zp], f"{path}/Sub"), scales], f"{path}/Mul")
        flat = self.op(
            "Reshape", [values, self.const("const.shape.00-1", np.array([0, 0, -1], np.int64))], f"{path}/Reshape"
        )
        if t.n_blocks * t.block != t.cols:  # padded last block
            flat = self.op(
                "Slice",
                [
                    flat,
                    self.const("const.i64.0", np.array([0], np.int64)),
                    self.const(f"{path}.cols", np.array([t.cols], np.int64)),
                    axis,
                ],
                f"{path}/Slice",
            )
        return flat

    def make_rope_tables(self, position_ids: str) -> tuple[str, str]:
        path = "/model/rotary_emb"
        pos = self.op("Cast", [position_ids], f"{path}/Cast", to=TensorProto.FLOAT)
        pos = self.op("Unsqueeze", [pos, self.const("const.axes.-1", np.array([-1], np.int64))], f"{path}/Unsqueeze")
        angles = self.op("Mul", [pos, self.weight(INV_FREQ)], f"{path}/Mul")  # [B,S,D/2]
        tables = []
        for fn in ("Cos", "Sin"):
            half = self.op(fn, [angles], f"{path}/{fn}")
            full = self.op("Concat", [half, half], f"{path}/{fn}_concat", axis=-1)  # [B,S,D]
            tables.append(
                self.op(
                    "Unsqueeze", [full, self.const("const.axes.2", np.array([2], np.int64))], f"{path}/{fn}_unsqueeze"
                )
            )  # [B,S,1,D]
        return tables[0], tables[1]

    def make_rope(self, x: str, cos: str, sin: str, path: str) -> str:
        # x [B, S, heads, D]: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]
        x1, x2 = self.node("Split", [x], f"{path}/Split", outputs=2, axis=-1, num_outputs=2)
        rotated = self.op("Concat", [self.op("Neg", [x2], f"{path}/Neg"), x1], f"{path}/Concat", axis=-1)
        return self.op(
            "Add",
            [self.op("Mul", [x, cos], f"{path}/Mul_cos"), self.op("Mul", [rotated, sin], f"{path}/Mul_sin")],
            f"{path}/Add",
        )

    def split_heads(self, x: str, heads: int, path: str) -> str:
        return self.op(
            "Reshape",
            [x, self.const(f"const.shape.heads{heads}", np.array([0, 0, heads, self.c.head_dim], np.int64))],
            f"{path}/Reshape",
        )  # [B, S, heads, D]

    def make_qkv(self, i: int, x: str, cos: str, sin: str) -> tuple[str, str, str]:
        """q [B,S,H,D] and k [B,S,KV,D] rotated, v [B,S,KV,D]: layer i's projections split into heads."""
        c = self.c
        path = f"/model/layers.{i}/self_attn"
        q, k, v = (
            self.make_linear(x, layer_module(i, role), node_path(layer_module(i, role)), c.attention_bias)
            for role in ("q_proj", "k_proj", "v_proj")
        )
        q = self.make_rope(self.split_heads(q, c.num_attention_heads, f"{path}/q"), cos, sin, f"{path}/q_rope")
        k = self.make_rope(self.split_heads(k, c.num_key_value_heads, f"{path}/k"), cos, sin, f"{path}/k_rope")
        return q, k, self.split_heads(v, c.num_key_value_heads, f"{path}/v")

    def make_attention(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        c = self.c
        path = f"/model/layers.{i}/self_attn"
        q, k, v = self.make_qkv(i, x, cos, sin)
        self.nodes.append(helper.make_node("Identity", [k], [f"new_key_values.{i}.key"], name=f"{path}/new_key"))
        self.nodes.append(helper.make_node("Identity", [v], [f"new_key_values.{i}.value"], name=f"{path}/new_value"))
        all_k = self.op("Concat", [f"past_key_values.{i}.key", k], f"{path}/all_keys", axis=1)  # [B,T,KV,D]
        all_v = self.op("Concat", [f"past_key_values.{i}.value", v], f"{path}/all_values", axis=1)
        # Grouped-query attention without repeating K/V: view the H query heads as [KV, G].
        group = c.num_attention_heads // c.num_key_value_heads
        q = self.op("Transpose", [q], f"{path}/q_T", perm=[0, 2, 1, 3])  # [B,H,S,D]
        qg = self.op(
            "Reshape",
            [
                q,
                self.const(
                    "const.shape.qgroups", np.array([0, c.num_key_value_heads, group, -1, c.head_dim], np.int64)
                ),
            ],
            f"{path}/q_groups",
        )  # [B,KV,G,S,D]
        kt = self.op(
            "Unsqueeze",
            [
                self.op("Transpose", [all_k], f"{path}/k_T", perm=[0, 2, 3, 1]),
                self.const("const.axes.2", np.array([2], np.int64)),
            ],
            f"{path}/k_u",
        )  # [B,KV,1,D,T]
        scale = self.const("const.f32.attn_scale", np.array(1.0 / np.sqrt(c.head_dim), np.float32))
        scores = self.op("Mul", [self.op("MatMul", [qg, kt], f"{path}/QK"), scale], f"{path}/scale")  # [B,KV,G,S,T]
        scores = self.op(
            "Where", [mask, scores, self.const("const.f32.-inf", np.array(-np.inf, np.float32))], f"{path}/mask"
        )
        probs = self.op("Softmax", [scores], f"{path}/Softmax", axis=-1)
        vu = self.op(
            "Unsqueeze",
            [
                self.op("Transpose", [all_v], f"{path}/v_T", perm=[0, 2, 1, 3]),
                self.const("const.axes.2", np.array([2], np.int64)),
            ],
            f"{path}/v_u",
        )  # [B,KV,1,T,D]
        out = self.op("MatMul", [probs, vu], f"{path}/PV")  # [B,KV,G,S,D]
        out = self.op("Transpose", [out], f"{path}/out_T", perm=[0, 3, 1, 2, 4])  # [B,S,KV,G,D]
        out = self.op(
            "Reshape",
            [out, self.const("const.shape.merge_heads", np.array([0, 0, c.q_size], np.int64))],
            f"{path}/merge_heads",
        )
        self.trace_points[f"{i}.attn"] = out
        return self.make_linear(out, layer_module(i, "o_proj"), node_path(layer_module(i, "o_proj")))

    def make_causal_mask(self, position_ids: str) -> str:
        """bool [B,1,1,S,T]: key slot j is visible to the query at position p when j <= p."""
        path = "/model/causal_mask"
        past = self.op("Shape", ["past_key_values.0.key"], f"{path}/past_len", start=1, end=2)  # [1] = P
        new = self.op("Shape", [position_ids], f"{path}/new_len", start=1, end=2)  # [1] = S
        total = self.op("Squeeze", [self.op("Add", [past, new], f"{path}/total")], f"{path}/Squeeze")
        slots = self.op(
            "Range",
            [
                self.const("const.i64.scalar0", np.array(0, np.int64)),
                total,
                self.const("const.i64.scalar1", np.array(1, np.int64)),
            ],
            f"{path}/Range",
        )  # [T]
        pos = self.op(
            "Unsqueeze", [position_ids, self.const("const.axes.-1", np.array([-1], np.int64))], f"{path}/pos_u"
        )  # [B,S,1]
        visible = self.op("LessOrEqual", [slots, pos], f"{path}/LessOrEqual")  # [B,S,T]
        return self.op(
            "Unsqueeze", [visible, self.const("const.axes.12", np.array([1, 2], np.int64))], f"{path}/Unsqueeze"
        )

    def make_mlp(self, i: int, x: str) -> str:
        gate_module, up_module, down_module = (layer_module(i, role) for role in ("gate_proj", "up_proj", "down_proj"))
        path = f"/model/layers.{i}/mlp"
        gate = self.make_linear(x, gate_module, node_path(gate_module))
        up = self.make_linear(x, up_module, node_path(up_module))
        act = self.op("Mul", [gate, self.op("Sigmoid", [gate], f"{path}/Sigmoid")], f"{path}/SiLU")
        return self.make_linear(self.op("Mul", [act, up], f"{path}/Mul"), down_module, node_path(down_module))

    def make_layer(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        path = f"/model/layers.{i}"
        h = self.make_rms_norm(x, layer_weight(i, "attn_norm"), node_path(layer_module(i, "attn_norm")))
        self.trace_points[f"{i}.attn_norm"] = h
        x = self.op("Add", [x, self.make_attention(i, h, cos, sin, mask)], f"{path}/residual_attn")
        self.trace_points[f"{i}.attn_residual"] = x
        h = self.make_rms_norm(x, layer_weight(i, "mlp_norm"), node_path(layer_module(i, "mlp_norm")))
        self.trace_points[f"{i}.mlp_norm"] = h
        x = self.op("Add", [x, self.make_mlp(i, h)], f"{path}/residual_mlp")
        self.trace_points[f"{i}.out"] = x
        return x

    def make_head(self, x: str) -> str:
        name = EMBED if self.c.tie_word_embeddings else LM_HEAD
        h = self.make_rms_norm(x, f"{FINAL_NORM}.weight", node_path(FINAL_NORM))
        self.trace_points["final_norm"] = h
        logits = self.make_linear(h, name, "/lm_head")
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/out"))
        return "logits"

    # -- the graph --------------------------------------------------------------------------
    def build(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The model (initializers not yet attached) and its arrays by initializer name."""
        c = self.c
        x = self.make_embedding("input_ids")
        cos, sin = self.make_rope_tables("position_ids")
        mask = self.make_causal_mask("position_ids")
        for i in range(c.num_hidden_layers):
            x = self.make_layer(i, x, cos, sin, mask)
        self.make_head(x)
        kv_shape = ["batch", "past_sequence", c.num_key_value_heads, c.head_dim]
        new_kv_shape = ["batch", "sequence", c.num_key_value_heads, c.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", c.vocab_size])]
        for i in range(c.num_hidden_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
                outputs.append(
                    helper.make_tensor_value_info(f"new_key_values.{i}.{kind}", TensorProto.FLOAT, new_kv_shape)
                )
        graph = helper.make_graph(self.nodes, f"edgellm-{c.architecture}", inputs, outputs)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgellm",
        )
        model.ir_version = 10
        helper.set_model_props(model, {TRACE_KEY: json.dumps(self.trace_points)})
        return model, self.arrays


def build_decoder_graph(config: ModelConfig, tensors: dict):
    """The graph and its initializers. `tensors` holds RoPE's table (INV_FREQ) as the exporter computed it.
    Every family so far differs from llama only in what its config carries (Qwen2's q/k/v biases:
    attention_bias), so one builder serves them all; a family whose graph differs subclasses it."""
    return DecoderGraphBuilder(config, tensors).build()
