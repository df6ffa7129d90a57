"""Lower the canonical model to static-shape ONNX decoder graphs for an NPU (QNN HTP).

NPUs compile a graph for fixed shapes, so there are two graphs over one fixed context window C:
a prefill graph over a chunk of S tokens (S = 64 by default) and a decode graph (S = 1).

Inputs:  inputs_embeds  float32 [1, S, E]        embedding rows, looked up on the host
         position_ids   int32   [1, S]           absolute positions (RoPE), each < C
         attention_mask float32 [1, S, C + S]    additive: 0 = visible, npu_host.MASK_VALUE = hidden
         past_key_values.{i}.key / .value float32 [1, KV, C, D]   the whole cache, valid or not
Outputs: logits float32 [1, S, V]
         new_key_values.{i}.key / .value float32 [1, KV, S, D]   this chunk's slice only
Every dimension is a number: nothing is symbolic (the table: npu_host.npu_graph_io, which the
runtime also checks a loaded graph against). Query s attends over [past slots 0..C-1, the
chunk's own S keys]; the host's mask hides the cache slots not yet written and the future of
the chunk, and the host writes the new slices into its cache (runtime/npu_host.py).

Only standard ONNX ops: plain MatMul on float weights (quantized to QDQ afterwards by
export/quant/npu.py), RMSNormalization, RoPE as Gather from cos/sin tables + Split/Neg/Concat,
grouped-query attention as batched MatMul over [KV, G*S] query rows (no repeated K/V) and no
com.microsoft fused op (the HTP refuses RotaryEmbedding and GroupQueryAttention).

The residual stream stays in floating point (fp16 on the HTP; `float_nodes` names those nodes for
the quantizer): llama-family models carry "massive activations" in it (SmolLM2: ~22000 in one
channel of the first token and of some delimiters, against ~1 elsewhere), which no per-tensor
16-bit scale can hold next to ordinary values. The same outliers are born in the MLP's product
(up to ~2800) and its down projection, so those run in fp16 too, with fp16 weights.
The embedding lookup stays on the host: the NPU's Gather takes only per-tensor quantized tables,
and one 8-bit scale for a whole vocabulary costs more accuracy than a host lookup of S rows costs time.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.backends.npu.host import npu_graph_io
from edgellm.bundle.architectures import layer_module, layer_role
from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.model_config import ModelConfig
from edgellm.export.graph.cpu import DecoderGraphBuilder, node_path

OPSET = 23  # RMSNormalization

# Nodes the quantizer leaves in float: the residual adds, every norm, the MLP's product and down projection.
FLOAT_NODES = re.compile(r".*/(residual_attn|residual_mlp|RMSNormalization|mlp/Mul|mlp/down_proj/\w+)$")


def float_nodes(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if FLOAT_NODES.fullmatch(node.name)]


class NpuGraphBuilder(DecoderGraphBuilder):
    """The CPU builder's layer structure (norms, MLP, RoPE rotation, residuals) over plain ops and
    static shapes. `tensors` are float32 arrays named like the checkpoint."""

    RMS_NORM = ("RMSNormalization", {})  # the standard op (opset 23): the NPU graphs hold no contrib ops

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], seq: int, context: int):
        super().__init__(config, tensors)
        self.seq, self.context = seq, context

    def make_matmul(self, x: str, name: str, path: str) -> str:
        """x [1,S,K] @ W.T for a float W [N,K], stored transposed as the MatMul's B [K,N]. The query
        projection carries attention's 1/sqrt(D) (RoPE is linear, so scaling before it is exact)."""
        w = np.asarray(self.tensors[name], np.float32).T
        key = f"{name}.T"
        if layer_role(name) == "q_proj":
            w, key = w / np.float32(np.sqrt(self.c.head_dim)), f"{name}.T.attn_scaled"
        if layer_role(name) == "down_proj":  # in fp16 (see the module docstring)
            x16 = self.op("Cast", [x], f"{path}/Cast_fp16", to=TensorProto.FLOAT16)
            w16 = self.const(f"{name}.T.fp16", np.ascontiguousarray(w.astype(np.float16)))
            return self.op(
                "Cast", [self.op("MatMul", [x16, w16], f"{path}/MatMul")], f"{path}/Cast_fp32", to=TensorProto.FLOAT
            )
        return self.op("MatMul", [x, self.const(key, np.ascontiguousarray(w))], f"{path}/MatMul")

    def make_linear(self, x: str, prefix: str, path: str, bias: bool = False) -> str:
        y = self.make_matmul(x, f"{prefix}.weight", path)
        if bias:
            b = np.asarray(self.tensors[f"{prefix}.bias"], np.float32)
            key = f"{prefix}.bias"
            if layer_role(prefix) == "q_proj":
                b, key = b / np.float32(np.sqrt(self.c.head_dim)), f"{prefix}.bias.attn_scaled"
            y = self.op("Add", [y, self.const(key, b)], f"{path}/Add")
        return y

    def make_rope_tables(self, position_ids: str) -> tuple[str, str]:
        """cos, sin [1,S,1,D] gathered from [C, D] tables at the given positions."""
        path = "/model/rotary_emb"
        inv_freq = self.tensors[INV_FREQ]  # the exporter's stored table, as every backend reads it
        angles = np.arange(self.context, dtype=np.float32)[:, None] * inv_freq[None, :]  # [C, D/2]
        tables = []
        for fn, values in (("cos", np.cos(angles)), ("sin", np.sin(angles))):
            table = self.const(f"model.rotary_emb.{fn}_table", np.concatenate([values, values], -1).astype(np.float32))
            rows = self.op("Gather", [table, position_ids], f"{path}/Gather_{fn}", axis=0)  # [1,S,D]
            tables.append(
                self.op(
                    "Reshape",
                    [rows, self.const("const.shape.rope", np.array([1, self.seq, 1, self.c.head_dim], np.int64))],
                    f"{path}/{fn}_heads",
                )
            )  # [1,S,1,D]
        return tables[0], tables[1]

    def make_attention(self, i: int, x: str, cos: str, sin: str, mask: str) -> str:
        c, s, t = self.c, self.seq, self.context + self.seq
        kv, group, d = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
        path = f"/model/layers.{i}/self_attn"
        q, k, v = self.make_qkv(i, x, cos, sin)  # [1,S,H,D], [1,S,KV,D], [1,S,KV,D]
        for kind, value in (("key", k), ("value", v)):
            self.nodes.append(
                helper.make_node(
                    "Transpose", [value], [f"new_key_values.{i}.{kind}"], name=f"{path}/new_{kind}", perm=[0, 2, 1, 3]
                )
            )  # [1,KV,S,D]
        all_k = self.op(
            "Concat", [f"past_key_values.{i}.key", f"new_key_values.{i}.key"], f"{path}/all_keys", axis=2
        )  # [1,KV,T,D]
        all_v = self.op(
            "Concat", [f"past_key_values.{i}.value", f"new_key_values.{i}.value"], f"{path}/all_values", axis=2
        )
        # Grouped-query attention without repeating K/V: the H = KV*G query heads as KV groups of G*S rows.
        q = self.op("Transpose", [q], f"{path}/q_T", perm=[0, 2, 1, 3])  # [1,H,S,D]
        qg = self.op(
            "Reshape",
            [q, self.const(f"const.shape.qgroups{s}", np.array([1, kv, group * s, d], np.int64))],
            f"{path}/q_groups",
        )  # [1,KV,G*S,D]
        kt = self.op("Transpose", [all_k], f"{path}/k_T", perm=[0, 1, 3, 2])  # [1,KV,D,T]
        scores = self.op("MatMul", [qg, kt], f"{path}/QK")  # [1,KV,G*S,T]
        scores = self.op(
            "Reshape",
            [scores, self.const(f"const.shape.heads_rows{s}", np.array([c.num_attention_heads, s, t], np.int64))],
            f"{path}/scores_heads",
        )  # [H,S,T]
        scores = self.op("Add", [scores, mask], f"{path}/mask")  # + [1,S,T]
        probs = self.op("Softmax", [scores], f"{path}/Softmax", axis=-1)
        probs = self.op(
            "Reshape",
            [probs, self.const(f"const.shape.groups_rows{s}", np.array([1, kv, group * s, t], np.int64))],
            f"{path}/probs_groups",
        )  # [1,KV,G*S,T]
        out = self.op("MatMul", [probs, all_v], f"{path}/PV")  # [1,KV,G*S,D]
        out = self.op(
            "Reshape",
            [out, self.const(f"const.shape.heads{s}", np.array([1, c.num_attention_heads, s, d], np.int64))],
            f"{path}/out_heads",
        )  # [1,H,S,D]
        out = self.op("Transpose", [out], f"{path}/out_T", perm=[0, 2, 1, 3])  # [1,S,H,D]
        out = self.op(
            "Reshape",
            [out, self.const(f"const.shape.merge_heads{s}", np.array([1, s, c.q_size], np.int64))],
            f"{path}/merge_heads",
        )
        return self.make_linear(out, layer_module(i, "o_proj"), node_path(layer_module(i, "o_proj")))

    def split_heads(self, x: str, heads: int, path: str) -> str:
        return self.op(
            "Reshape",
            [
                x,
                self.const(
                    f"const.shape.split{self.seq}x{heads}", np.array([1, self.seq, heads, self.c.head_dim], np.int64)
                ),
            ],
            f"{path}/Reshape",
        )  # [1, S, heads, D]

    def build(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        c = self.c
        x = "inputs_embeds"
        cos, sin = self.make_rope_tables("position_ids")
        for i in range(c.num_hidden_layers):
            x = self.make_layer(i, x, cos, sin, "attention_mask")
        self.make_head(x)
        input_shapes, output_shapes = npu_graph_io(c, self.seq, self.context)
        types = {"position_ids": TensorProto.INT32}
        inputs = [
            helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), shape)
            for name, shape in input_shapes.items()
        ]
        outputs = [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in output_shapes.items()
        ]
        graph = helper.make_graph(
            self.nodes, f"edgellm-{c.architecture}-npu-s{self.seq}-c{self.context}", inputs, outputs
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgellm")
        model.ir_version = 10
        return model, self.arrays


def build_npu_graph(config: ModelConfig, tensors: dict[str, np.ndarray], seq: int, context: int):
    """The float graph (initializers not yet attached) and its arrays by initializer name."""
    return NpuGraphBuilder(config, tensors, seq, context).build()
