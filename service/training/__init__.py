"""Offline training: distillation loss and trainers, temperature fit, ONNX export.

torch is imported here and in `service.demo` only; the serving path never imports this
package (except `service.training.temperature`, which is pure numpy so a recalibration
job can run on a serving host without torch).
"""
