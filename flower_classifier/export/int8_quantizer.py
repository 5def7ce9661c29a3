"""XNNPACK's int8 quantiser (PT2E) with each ReLU6 fused into the convolution before it, as
TFLite quantises EfficientNet-Lite.

XNNPACKQuantizer fuses conv->relu but not conv->hardtanh(0, 6), the ReLU6 of every
EfficientNet-Lite block: it observes the int8 range of the convolution's output before the
clamp (batch norm folded in, that output spans tens), so [0, 6] gets few of the 256 levels and
the model loses points. Annotated here as XNNPACKQuantizer annotates conv->relu (the
convolution's output not observed, the clamp's is), the range is [0, 6]; XNNPACK's lowering fuses
the clamp into the convolution, so the .pte runs the same int8 graph. Imported only for
export.py --dtype int8: it needs ExecuTorch (requirements-export.txt).
"""
import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    CONV_TARGETS,
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (
    get_bias_qspec,
    get_input_act_qspec,
    get_output_act_qspec,
    get_weight_qspec,
)
from torchao.quantization.pt2e.quantizer import (
    ComposableQuantizer,
    QuantizationAnnotation,
    Quantizer,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY as ANNOTATION

HARDTANH = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
RELU6_RANGE = (0, 6)


def is_relu6(node):
    return (node.op == "call_function" and node.target in HARDTANH
            and tuple(node.args[1:3]) == RELU6_RANGE)


def conv_relu6_pairs(graph):
    """(conv, relu6) for each convolution whose only user is a ReLU6: the pairs XNNPACK fuses."""
    pairs = []
    for node in graph.nodes:
        conv = node.args[0] if is_relu6(node) else None
        if (isinstance(conv, torch.fx.Node) and conv.target in CONV_TARGETS
                and len(conv.users) == 1):
            pairs.append((conv, node))
    return pairs


def mark_annotated(nodes):
    """Claims the weight and bias nodes so that no later quantiser annotates them again."""
    for node in nodes:
        node.meta.setdefault(ANNOTATION, QuantizationAnnotation())._annotated = True


class ConvReLU6Quantizer(Quantizer):
    """Annotates conv->ReLU6 pairs: input, weight and bias quantised on the convolution, the
    output observed after the ReLU6 only."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def annotate(self, model):
        for conv, relu6 in conv_relu6_pairs(model.graph):
            inputs = {conv.args[0]: get_input_act_qspec(self.config),
                      conv.args[1]: get_weight_qspec(self.config)}
            bias = conv.args[2] if len(conv.args) > 2 else None
            if isinstance(bias, torch.fx.Node):
                inputs[bias] = get_bias_qspec(self.config)
            conv.meta[ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs,
                                                           _annotated=True)
            relu6.meta[ANNOTATION] = QuantizationAnnotation(
                output_qspec=get_output_act_qspec(self.config), _annotated=True)
            mark_annotated([node for node in conv.args[1:3] if isinstance(node, torch.fx.Node)])
        return model

    def validate(self, model):
        pass


def int8_quantizer():
    """XNNPACK's symmetric per-channel int8 quantiser, conv->ReLU6 pairs annotated first."""
    config = get_symmetric_quantization_config(is_per_channel=True)
    return ComposableQuantizer([ConvReLU6Quantizer(config), XNNPACKQuantizer().set_global(config)])
