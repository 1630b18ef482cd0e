"""The build flags leave the C++ standard to torch (issue 8): torch.utils.cpp_extension
adds the -std its headers need only when the flags name none."""
import os
import re

import pytest

from fastkd.backends import cpp_build as _build


@pytest.mark.parametrize("flags", ["cxx", "nvcc"])
def test_no_cxx_standard_is_hard_coded(flags):
    chosen = _build.cxx_flags() if flags == "cxx" else _build.nvcc_flags()
    assert not [f for f in chosen if re.match(r"(-|--|/)std[=:]", f)], chosen


def test_torch_std_flag_meets_what_aten_requires():
    from torch.utils.cpp_extension import include_paths

    flag = _build.torch_std_flag()
    std = int(re.fullmatch(r"-std=c\+\+(\d+)", flag).group(1))
    assert std >= 17
    header = next(os.path.join(p, "ATen", "ATen.h") for p in include_paths()
                  if os.path.isfile(os.path.join(p, "ATen", "ATen.h")))
    with open(header, encoding="utf-8", errors="replace") as f:
        required = re.search(r"C\+\+(\d+) or later", f.read())
    if required:
        assert std >= int(required.group(1))
