"""Networks: the registry, torchvision encoders for MONAI's FlexibleUNet, weight resolution."""
