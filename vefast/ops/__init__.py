"""One file per fused op: Triton kernels (fwd + bwd), launcher, torch.library op, functional API and
eager reference. Import the op modules directly (``vefast.ops.reparam``) or use the re-exports of
:mod:`vefast`."""
