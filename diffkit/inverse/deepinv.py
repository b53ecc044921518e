"""deepinv's forward models as diffkit operators (``Operator.from_deepinv(physics)``).

deepinv works on images in [0, 1], diffkit on [-1, 1]; the operator maps x to deepinv's noise-free
``physics.A((x + 1) / 2)``, so measurements stay in deepinv's units and a measurement deepinv made can be passed
as it is. deepinv is an optional peer (it needs torchvision); nothing here imports it.
"""

import torch

from .operators import Operator, _image_shape


class DeepinvOperator(Operator):
    """x -> A((x + 1) / 2) for a deepinv ``Physics``: ``pinv`` is deepinv's ``A_dagger`` mapped back to [-1, 1] (a right
    inverse wherever A_dagger is one), ``adjoint`` is the adjoint of the linear part, A^T y / 2."""

    def __init__(self, physics, sigma_y: float | None = None):
        if not callable(getattr(physics, "A", None)):
            raise TypeError(f"physics must be a deepinv Physics with a noise-free A(x), got {type(physics).__name__}")
        if sigma_y is None:  # deepinv's Gaussian noise model carries its std
            sigma_y = float(getattr(getattr(physics, "noise_model", None), "sigma", 0.0) or 0.0)
        super().__init__(sigma_y)
        self.physics = physics
        self.linear_part = callable(getattr(physics, "A_adjoint", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.physics.A((x + 1) / 2)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint of x -> A(x) / 2, the linear part of this affine map."""
        if not self.linear_part:
            raise TypeError(f"{type(self.physics).__name__} is not a linear physics: it has no A_adjoint")
        return self.physics.A_adjoint(y) / 2

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        if callable(getattr(self.physics, "A_dagger", None)):
            return 2 * self.physics.A_dagger(y) - 1
        if self.linear_part:
            return 2 * self.physics.A_adjoint(y) - 1
        return super().pinv(y)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.forward(torch.zeros(_image_shape(input_shape))).shape)

    def input_shape(self, output_shape) -> tuple[int, ...]:
        if not self.linear_part:
            raise ValueError("the image shape of a nonlinear deepinv physics is unknown: pass the starting noise")
        with torch.no_grad():
            return tuple(self.physics.A_adjoint(torch.zeros(tuple(int(n) for n in output_shape))).shape)
