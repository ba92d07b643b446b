"""ADQ codebook options: the vectorised initialisation (sorted rows), and its equality with the
reference it replaced."""

import pytest
import torch

from adq_hf.quantizers import CodebookWeightQuantizer
from adq_hf.quantizers.codebook import SortedRows, initial_codebook, move_levels, nearest_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_raw_codebook(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantile initialisation as documented, one row and one side at a time with torch.quantile
    (the loop adq_hf ran before the vectorised version)."""
    books = []
    k_total = 2**bits - 1
    for row in rows:
        neg, pos = -row[row < 0], row[row > 0]
        small = k_total // 2
        pos_k = k_total - small if pos.sum() >= neg.sum() else small
        sides = []
        for mags, k, other in ((neg, k_total - pos_k, pos), (pos, pos_k, neg)):
            mags = mags if mags.numel() else other
            if mags.numel() == 0:
                sides.append(torch.arange(1, k + 1, dtype=row.dtype) * 1e-8)
                continue
            probs = (torch.arange(k, dtype=row.dtype) + 0.5) / k
            sides.append(torch.quantile(mags, probs))
        books.append(torch.cat([-sides[0].flip(0), row.new_zeros(1), sides[1]]))
    return torch.stack(books)


def _rows_of_every_kind():
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(3.0).sample((24, 200))
    sparse = torch.randn(8, 120) * (torch.rand(8, 120) < 0.3)
    one_sided = torch.rand(4, 60)
    with_zero_rows = torch.cat([torch.zeros(2, 60), torch.randn(2, 60)])
    return {"gaussian": torch.randn(32, 300), "heavy": heavy, "sparse": sparse, "one_sided": one_sided,
            "zero_rows": with_zero_rows, "short": torch.randn(5, 3)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vectorised_quantiles_equal_the_per_row_reference(bits):
    for name, rows in _rows_of_every_kind().items():
        expected = _reference_raw_codebook(rows, bits)
        got = initial_codebook(rows, bits)
        scale = rows.abs().max().clamp(min=1)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * scale), name
        assert ((got == 0).sum(dim=1) == 1).all(), name


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("init", ["quantile", "uniform"])
def test_sorted_lloyd_iterations_equal_the_scatter_update(bits, init):
    # the sorted-row iterations are move_levels(decay 0) computed from running sums: same levels
    for name, rows in _rows_of_every_kind().items():
        book = initial_codebook(rows, bits, init=init)
        for _ in range(12):
            book = move_levels(book, rows, 0.0)
        got = initial_codebook(rows, bits, init=init, iters=12)
        assert torch.allclose(got, book, rtol=1e-5, atol=1e-6), (name, (got - book).abs().max())


def test_iterations_stop_at_the_fixed_point():
    torch.manual_seed(1)
    rows = torch.randn(6, 40)
    converged = initial_codebook(rows, 2, iters=10_000)
    assert torch.equal(SortedRows(rows).lloyd_step(converged), converged)
    assert torch.allclose(move_levels(converged, rows, 0.0), converged, atol=1e-6)  # float32 sums there


def test_sorted_rows_error_equals_the_rounding_error():
    torch.manual_seed(2)
    rows = torch.randn(7, 90)
    importance = torch.rand(7, 90)
    book = initial_codebook(rows, 3, iters=5)
    rounded = book.gather(1, nearest_codes(rows, book)).double()
    rows, importance = rows.double(), importance.double()
    plain = SortedRows(rows, squares=True).error(book)
    weighted = SortedRows(rows, importance, squares=True).error(book)
    assert torch.allclose(plain, ((rounded - rows) ** 2).sum(dim=1), rtol=1e-9, atol=1e-9)
    assert torch.allclose(weighted, (importance * (rounded - rows) ** 2).sum(dim=1), rtol=1e-9, atol=1e-9)


def test_rows_are_initialised_in_chunks_with_the_same_result(monkeypatch):
    from adq_hf.quantizers import codebook

    torch.manual_seed(3)
    rows = torch.randn(10, 50)
    whole = initial_codebook(rows, 3, iters=30)
    monkeypatch.setattr(codebook, "INIT_CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    assert torch.equal(initial_codebook(rows, 3, iters=30), whole)


def test_quantizer_init_from_a_conv_weight_per_channel():
    torch.manual_seed(4)
    weight = torch.randn(8, 4, 3, 3)
    q = CodebookWeightQuantizer(2, num_groups=8)
    q.init_from(weight)
    assert torch.equal(q.codebook, initial_codebook(weight.reshape(8, -1), 2, iters=30))
