"""Domain adaptation: closing the gap between the scanner a model was trained on and another one.

- :mod:`~medtl.adaptation.batchnorm`: AdaBN, BatchNorm statistics re-estimated on unlabelled
  target images, every weight unchanged.
- :mod:`~medtl.adaptation.dsbn`: domain-specific BatchNorm, one BatchNorm per site behind shared
  convolutions.
- :mod:`~medtl.adaptation.dann`: adversarial training (DANN), a domain classifier on the encoder's
  features behind a gradient reversal layer.
- :mod:`~medtl.adaptation.adapt_package`: ``medtl adapt``, AdaBN applied to a model package.
"""
