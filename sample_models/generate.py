#!/usr/bin/env python
"""Deterministic generator for the dsrewrite sample ONNX models.

Writes small float32 ONNX models (opset 17, IR version 8) next to this file:

    vgg_small.onnx          VGG-style 2D CNN with 6 3x3 convs
    resnet_bn.onnx          ResNet-style net with unfused BatchNormalization
    audio_conv1d.onnx       1D (Conv1d) keyword-spotting style net
    grouped_depthwise.onnx  standard / grouped / depthwise / 1x1 / 5x5 SAME_UPPER convs
    dynamic_batch.onnx      symbolic batch dim, no-bias / asymmetric-pad / dilated convs,
                            one weight supplied by a Constant node

Only numpy and onnx are used.  All randomness comes from np.random.default_rng
with fixed seeds, so running the script twice yields byte-identical files.

Conv weights are "trained-like": for every input channel m, the slice
W[:, m] reshaped to (N, K) (N output channels of the group, K kernel taps) is a
sum of a few rank-1 terms s_j * u_j v_j^T with geometrically decaying s_j and
smooth kernel patterns v_j (Gaussian blurs, derivative-of-Gaussian, Laplacian,
smoothed noise), plus ~5 % noise.  Tensors are then scaled He-style so
activations stay O(1) through the networks.

Usage:  python sample_models/generate.py [--verbose]
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "dsrewrite-sample-models"
OUT_DIR = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# Trained-like weight synthesis
# --------------------------------------------------------------------------

def _smooth_patterns(rng, kshape, count):
    """Return `count` smooth kernel patterns of shape kshape, flattened (count, K)."""
    if len(kshape) == 2:
        kh, kw = kshape
        y, x = np.meshgrid(np.arange(kh) - (kh - 1) / 2.0,
                           np.arange(kw) - (kw - 1) / 2.0, indexing="ij")
    else:
        (k,) = kshape
        x = np.arange(k) - (k - 1) / 2.0
        y = np.zeros_like(x)
    pats = []
    # The first pattern is always a (low-frequency) blob or first derivative:
    # trained filters are dominated by low-frequency content.
    first_kinds = ["gauss", "dx", "dy", "doriented"] if len(kshape) == 2 else ["gauss", "dx"]
    all_kinds = (["gauss", "dx", "dy", "doriented", "lap", "dxy", "smooth_rand"]
                 if len(kshape) == 2 else ["gauss", "dx", "dxx", "smooth_rand"])
    for i in range(count):
        kind = first_kinds[rng.integers(len(first_kinds))] if i == 0 else \
            all_kinds[rng.integers(len(all_kinds))]
        sigma = rng.uniform(0.6, 1.4) * max(1.0, (max(kshape) - 1) / 2.0)
        g = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
        if kind == "gauss":
            p = g
        elif kind == "dx":
            p = -x * g
        elif kind == "dy":
            p = -y * g
        elif kind == "doriented":
            th = rng.uniform(0, np.pi)
            p = -(np.cos(th) * x + np.sin(th) * y) * g
        elif kind == "lap":
            r2 = x ** 2 + y ** 2
            p = (r2 / sigma ** 2 - 2.0) * g
        elif kind == "dxy":
            p = x * y * g
        elif kind == "dxx":
            p = (x ** 2 / sigma ** 2 - 1.0) * g
        else:  # smoothed random
            n = rng.standard_normal(x.shape)
            if len(kshape) == 2:
                n = n + 0.5 * (np.roll(n, 1, 0) + np.roll(n, -1, 0)
                               + np.roll(n, 1, 1) + np.roll(n, -1, 1))
            else:
                n = n + 0.5 * (np.roll(n, 1) + np.roll(n, -1))
            p = n * g
        p = p.reshape(-1)
        nrm = np.linalg.norm(p)
        if nrm < 1e-8:
            p = rng.standard_normal(p.shape)
            nrm = np.linalg.norm(p)
        pats.append(p / nrm)
    return np.stack(pats, 0)


def _orthonormal_cols(rng, a, n_cols):
    q, _ = np.linalg.qr(rng.standard_normal((a, n_cols)))
    return q


def trained_like_conv_weight(rng, out_ch, in_ch, kshape, group=1,
                             max_terms=5, decay=(0.45, 0.70), noise=0.05,
                             gain=1.2):
    """Conv weight (out_ch, in_ch // group, *kshape) with trained-like structure."""
    assert out_ch % group == 0 and in_ch % group == 0
    n_g = out_ch // group
    m_g = in_ch // group
    K = int(np.prod(kshape))
    w = np.zeros((out_ch, m_g, K), dtype=np.float64)
    for g in range(group):
        rows = slice(g * n_g, (g + 1) * n_g)
        for m in range(m_g):
            t = max(1, min(max_terms, n_g, K))
            if K == 1:
                block = rng.standard_normal((n_g, 1))
            else:
                # smooth patterns, orthonormalised (first one kept up to sign)
                pats = _smooth_patterns(rng, kshape, t)            # (t, K)
                q, r = np.linalg.qr(pats.T)                        # (K, t)
                q = q * np.sign(np.where(np.diag(r) == 0, 1, np.diag(r)))
                u = _orthonormal_cols(rng, n_g, t)                 # (n_g, t)
                r_dec = rng.uniform(*decay)
                s = r_dec ** np.arange(t)
                block = (u * s) @ q.T                              # (n_g, K)
                block += noise * np.linalg.norm(block) / np.sqrt(block.size) \
                    * rng.standard_normal(block.shape)
            # per-input-channel importance varies, as in trained nets
            block *= np.exp(0.3 * rng.standard_normal())
            w[rows, m, :] = block
    # He-style scaling: Var(w) = gain^2 / fan_in.  gain is a bit below sqrt(2)
    # because smooth kernels amplify the spatially correlated post-Relu activations.
    fan_in = m_g * K
    w *= gain / np.sqrt(fan_in) / np.sqrt(np.mean(w ** 2))
    return w.reshape((out_ch, m_g) + tuple(kshape)).astype(np.float32)


def he_matrix(rng, out_f, in_f, gain=1.0):
    return (rng.standard_normal((out_f, in_f)) * gain / np.sqrt(in_f)).astype(np.float32)


def small_bias(rng, n, scale=0.05):
    return rng.uniform(-scale, scale, size=n).astype(np.float32)


def rank1_energy_fractions(w, group=1):
    """Per layer: sum_m s_1^2 / sum_m sum_j s_j^2 over input channels m of W[:, m] (N x K)."""
    out_ch, m_g = w.shape[:2]
    n_g = out_ch // group
    num = den = 0.0
    for g in range(group):
        for m in range(m_g):
            blk = w[g * n_g:(g + 1) * n_g, m].reshape(n_g, -1).astype(np.float64)
            s = np.linalg.svd(blk, compute_uv=False)
            num += s[0] ** 2
            den += np.sum(s ** 2)
    return num / den


# --------------------------------------------------------------------------
# Graph-building helper
# --------------------------------------------------------------------------

class GraphBuilder:
    def __init__(self, rng):
        self.rng = rng
        self.nodes = []
        self.inits = []
        self.conv_weights = {}  # node name -> (weight, group)

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name=name))
        return name

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x, name, in_ch, out_ch, kshape, bias=True, group=1,
             weight_from_constant=False, trained_like=True, **attrs):
        if trained_like:
            w = trained_like_conv_weight(self.rng, out_ch, in_ch, kshape, group=group)
        else:
            w = (self.rng.standard_normal((out_ch, in_ch // group) + tuple(kshape))
                 * np.sqrt(2.0 / (in_ch // group * np.prod(kshape)))).astype(np.float32)
        wname = name.replace("/", ".") + ".weight"
        if weight_from_constant:
            self.node("Constant", [], [wname], name + "/weight_const",
                      value=numpy_helper.from_array(w, name=wname))
        else:
            self.init(wname, w)
        inputs = [x, wname]
        if bias:
            inputs.append(self.init(name.replace("/", ".") + ".bias", small_bias(self.rng, out_ch)))
        if group != 1:
            attrs["group"] = group
        attrs.setdefault("kernel_shape", list(kshape))
        self.conv_weights[name] = (w, group)
        return self.node("Conv", inputs, [name + "_out"], name, **attrs)

    def bn(self, x, name, ch):
        rng = self.rng
        p = name.replace("/", ".")
        scale = self.init(p + ".weight", rng.uniform(0.5, 1.5, ch).astype(np.float32))
        b = self.init(p + ".bias", rng.uniform(-0.1, 0.1, ch).astype(np.float32))
        mean = self.init(p + ".running_mean", rng.uniform(-0.1, 0.1, ch).astype(np.float32))
        var = self.init(p + ".running_var", rng.uniform(0.5, 2.0, ch).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, b, mean, var], [name + "_out"],
                         name, epsilon=1e-5, momentum=0.9)

    def relu(self, x, name):
        return self.node("Relu", [x], [name + "_out"], name)

    def gemm(self, x, name, in_f, out_f, out_name):
        p = name.replace("/", ".")
        w = self.init(p + ".weight", he_matrix(self.rng, out_f, in_f))
        b = self.init(p + ".bias", small_bias(self.rng, out_f))
        return self.node("Gemm", [x, w, b], [out_name], name, alpha=1.0, beta=1.0, transB=1)

    def model(self, graph_name, inputs, outputs, doc):
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs,
                                  initializer=self.inits, doc_string=doc)
        m = helper.make_model(graph, producer_name=PRODUCER, producer_version="1.0",
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              doc_string=doc)
        m.ir_version = IR_VERSION
        m.model_version = 1
        return m


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def build_vgg_small():
    b = GraphBuilder(np.random.default_rng(1001))
    x = "input"
    cfg = [("conv1", 3, 16), ("conv2", 16, 32), "pool1",
           ("conv3", 32, 32), ("conv4", 32, 64), "pool2",
           ("conv5", 64, 64), ("conv6", 64, 64)]
    i_relu = 0
    for c in cfg:
        if isinstance(c, str):
            x = b.node("MaxPool", [x], [c + "_out"], c, kernel_shape=[2, 2], strides=[2, 2])
            continue
        name, ci, co = c
        x = b.conv(x, name, ci, co, (3, 3), pads=[1, 1, 1, 1], strides=[1, 1])
        i_relu += 1
        x = b.relu(x, "relu%d" % i_relu)
    x = b.node("GlobalAveragePool", [x], ["gap_out"], "gap")
    x = b.node("Flatten", [x], ["flatten_out"], "flatten", axis=1)
    b.gemm(x, "fc", 64, 10, "logits")
    doc = ("Synthetic VGG-style 2D CNN (dsrewrite sample). Input 'input' [1,3,64,64]; "
           "6 Conv 3x3 pad 1 (3->16->32, maxpool, 32->32->64, maxpool, 64->64->64) each "
           "followed by Relu, GlobalAveragePool, Flatten, Gemm to 10 classes -> 'logits'. "
           "Weights are synthetic but trained-like: per input channel, W[:, m] is a sum of "
           "a few rank-1 terms with geometrically decaying singular values and smooth 3x3 "
           "patterns, plus ~5% noise, He-scaled.")
    m = b.model("vgg_small", [vi("input", [1, 3, 64, 64])], [vi("logits", [1, 10])], doc)
    return m, b, {"input": (1, 3, 64, 64)}


def build_resnet_bn():
    b = GraphBuilder(np.random.default_rng(2002))
    x = b.conv("input", "stem/conv", 3, 16, (3, 3), bias=False, pads=[1, 1, 1, 1])
    x = b.bn(x, "stem/bn", 16)
    x = b.relu(x, "stem/relu")

    def basic_block(x, prefix, ci, co, stride):
        y = b.conv(x, prefix + "/conv1", ci, co, (3, 3), bias=False,
                   pads=[1, 1, 1, 1], strides=[stride, stride])
        y = b.bn(y, prefix + "/bn1", co)
        y = b.relu(y, prefix + "/relu1")
        y = b.conv(y, prefix + "/conv2", co, co, (3, 3), bias=False, pads=[1, 1, 1, 1])
        y = b.bn(y, prefix + "/bn2", co)
        if stride != 1 or ci != co:
            s = b.conv(x, prefix + "/downsample/conv", ci, co, (1, 1), bias=False,
                       strides=[stride, stride])
            s = b.bn(s, prefix + "/downsample/bn", co)
        else:
            s = x
        y = b.node("Add", [y, s], [prefix + "/add_out"], prefix + "/add")
        return b.relu(y, prefix + "/relu2")

    x = basic_block(x, "block1", 16, 16, 1)
    x = basic_block(x, "block2", 16, 32, 2)
    x = b.node("GlobalAveragePool", [x], ["gap_out"], "gap")
    x = b.node("Flatten", [x], ["flatten_out"], "flatten", axis=1)
    b.gemm(x, "fc", 32, 10, "logits")
    doc = ("Synthetic ResNet-style CNN with UNFUSED BatchNormalization (dsrewrite sample). "
           "Input 'input' [1,3,32,32]; stem Conv3x3(no bias)-BN-Relu 3->16, basic block "
           "16->16 (identity skip), basic block 16->32 stride 2 with 1x1 projection conv + BN "
           "on the skip path, GlobalAveragePool, Flatten, Gemm to 10 -> 'logits'. "
           "BN: gamma~U(0.5,1.5), beta/mean small, var~U(0.5,2), eps 1e-5. Conv weights are "
           "synthetic trained-like (decaying per-input-channel spectrum, smooth kernels).")
    m = b.model("resnet_bn", [vi("input", [1, 3, 32, 32])], [vi("logits", [1, 10])], doc)
    return m, b, {"input": (1, 3, 32, 32)}


def build_audio_conv1d():
    b = GraphBuilder(np.random.default_rng(3003))
    x = b.conv("audio_features", "conv1", 40, 64, (5,), pads=[2, 2])
    x = b.relu(x, "relu1")
    x = b.conv(x, "conv2", 64, 64, (3,), pads=[1, 1], strides=[2])
    x = b.relu(x, "relu2")
    x = b.conv(x, "conv3", 64, 96, (3,), pads=[2, 2], dilations=[2])
    x = b.relu(x, "relu3")
    x = b.node("ReduceMean", [x], ["pool_out"], "time_mean", axes=[2], keepdims=0)
    b.gemm(x, "fc", 96, 12, "scores")
    doc = ("Synthetic 1D audio keyword-spotting conv net (dsrewrite sample). Input "
           "'audio_features' [1,40,100] (40 mel bands x 100 frames); Conv1d k5 pad2 40->64, "
           "Relu, Conv1d k3 stride2 pad1 64->64, Relu, Conv1d k3 dilation2 pad2 64->96, Relu, "
           "ReduceMean over time (axes attribute, opset 17), Gemm to 12 keywords -> 'scores'. "
           "Conv weights are synthetic trained-like (decaying spectrum, smooth 1D kernels).")
    m = b.model("audio_conv1d", [vi("audio_features", [1, 40, 100])],
                [vi("scores", [1, 12])], doc)
    return m, b, {"audio_features": (1, 40, 100)}


def build_grouped_depthwise():
    b = GraphBuilder(np.random.default_rng(4004))
    x = b.conv("input", "conv_std", 16, 32, (3, 3), pads=[1, 1, 1, 1])
    x = b.relu(x, "relu1")
    x = b.conv(x, "conv_grouped", 32, 32, (3, 3), group=4, pads=[1, 1, 1, 1])
    x = b.relu(x, "relu2")
    x = b.conv(x, "conv_depthwise", 32, 32, (3, 3), group=32, pads=[1, 1, 1, 1])
    x = b.relu(x, "relu3")
    x = b.conv(x, "conv_pointwise", 32, 64, (1, 1))
    x = b.relu(x, "relu4")
    b.nodes.append(helper.make_node(
        "Conv", [x, b.init("conv_5x5_same.weight",
                           trained_like_conv_weight(b.rng, 32, 64, (5, 5))),
                 b.init("conv_5x5_same.bias", small_bias(b.rng, 32))],
        ["features"], name="conv_5x5_same", kernel_shape=[5, 5], strides=[2, 2],
        auto_pad="SAME_UPPER"))
    doc = ("Synthetic conv-variety model (dsrewrite sample). Input 'input' [1,16,32,32]; "
           "standard Conv3x3 16->32, grouped Conv3x3 32->32 group=4, depthwise Conv3x3 "
           "32->32 group=32, pointwise Conv1x1 32->64, Conv5x5 auto_pad=SAME_UPPER stride 2 "
           "64->32, Relu between -> 'features' [1,32,16,16]. Weights synthetic trained-like.")
    m = b.model("grouped_depthwise", [vi("input", [1, 16, 32, 32])],
                [vi("features", [1, 32, 16, 16])], doc)
    return m, b, {"input": (1, 16, 32, 32)}


def build_dynamic_batch():
    b = GraphBuilder(np.random.default_rng(5005))
    x = b.conv("images", "conv1", 3, 16, (3, 3), pads=[1, 1, 1, 1])
    x = b.relu(x, "relu1")
    x = b.conv(x, "conv2_nobias", 16, 16, (3, 3), bias=False, pads=[1, 1, 1, 1])
    x = b.relu(x, "relu2")
    x = b.conv(x, "conv3_asym_s2", 16, 32, (3, 3), pads=[0, 0, 1, 1], strides=[2, 2])
    x = b.relu(x, "relu3")
    x = b.conv(x, "conv4_dilated", 32, 32, (3, 3), pads=[2, 2, 2, 2], dilations=[2, 2],
               weight_from_constant=True)
    b.node("Relu", [x], ["features"], "relu4")
    doc = ("Synthetic model with a symbolic batch dimension (dsrewrite sample). Input "
           "'images' [batch,3,48,48]; Conv3x3 3->16, Conv3x3 16->16 without bias, Conv3x3 "
           "16->32 stride 2 with asymmetric pads [0,0,1,1], Conv3x3 32->32 dilation 2 whose "
           "weight comes from a Constant node (not an initializer), Relu after each -> "
           "'features' [batch,32,24,24]. Weights synthetic trained-like.")
    m = b.model("dynamic_batch", [vi("images", ["batch", 3, 48, 48])],
                [vi("features", ["batch", 32, 24, 24])], doc)
    return m, b, {"images": (2, 3, 48, 48)}


MODELS = [
    ("vgg_small", build_vgg_small),
    ("resnet_bn", build_resnet_bn),
    ("audio_conv1d", build_audio_conv1d),
    ("grouped_depthwise", build_grouped_depthwise),
    ("dynamic_batch", build_dynamic_batch),
]


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------

def run_check(model, feeds_shapes, verbose=False):
    """Run onnxruntime on a random input; assert finite, reasonably scaled outputs.

    With verbose, also report the RMS of every intermediate tensor (on a copy of the
    model with extra graph outputs; the written model is unaffected).
    """
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in feeds_shapes.items()}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    out_names = [o.name for o in model.graph.output]
    if verbose:
        for n in probe.graph.node:
            if n.op_type != "Constant" and n.output[0] not in out_names:
                probe.graph.output.append(helper.make_empty_tensor_value_info(n.output[0]))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    for name in out_names:
        y = outs[name]
        assert np.all(np.isfinite(y)), "%s: non-finite output" % name
        rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
        assert 1e-2 < rms < 1e2, "%s: output RMS %g out of range" % (name, rms)
    if verbose:
        for n in model.graph.node:
            if n.op_type == "Constant":
                continue
            y = outs[n.output[0]]
            print("    %-28s %-20s shape=%-18s rms=%.4f" % (
                n.name, n.op_type, list(y.shape), np.sqrt(np.mean(y.astype(np.float64) ** 2))))
    return outs


def main(argv):
    verbose = "--verbose" in argv or "-v" in argv
    for name, fn in MODELS:
        model, builder, feeds = fn()
        onnx.checker.check_model(model, full_check=True)
        run_check(model, feeds, verbose=verbose)
        path = os.path.join(OUT_DIR, name + ".onnx")
        data = model.SerializeToString()
        with open(path, "wb") as f:
            f.write(data)
        n_conv = sum(1 for n in model.graph.node if n.op_type == "Conv")
        print("%-24s convs=%d  size=%d bytes" % (name + ".onnx", n_conv, len(data)))
        if verbose:
            for cname, (w, g) in builder.conv_weights.items():
                if int(np.prod(w.shape[2:])) > 1 and w.shape[0] // g > 1:
                    print("    rank-1 energy fraction %-24s %.3f" % (
                        cname, rank1_energy_fractions(w, g)))


if __name__ == "__main__":
    main(sys.argv[1:])
