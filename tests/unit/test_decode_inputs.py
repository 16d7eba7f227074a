"""Pure-decode step inputs (padding rows, slots, block tables) and the CUDA-graph bucket sizes, on the CPU."""

import pytest
import torch

from engine.cuda_graphs import bucket_sizes
from engine.decode_inputs import LENGTH, POSITION, SLOT, TOKEN, is_pure_decode, prepare_decode
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq


def seq(tokens, start, table):
    return ScheduledSeq("r", tokens, start, table, True, SamplingParams(), 0)


def test_prepare_decode_packs_and_pads():
    # block_size 4: position 5 is block_table[1] offset 1; position 0 is block_table[0] offset 0
    seqs = [seq([11], 5, [7, 3]), seq([12], 0, [9]), seq([13], 8, [1, 2, 6])]
    x = prepare_decode(seqs, 4, padded=5)
    assert x.num_seqs == 3 and x.padded == 5
    assert x.packed[TOKEN].tolist() == [11, 12, 13, 0, 0]
    assert x.packed[POSITION].tolist() == [5, 0, 8, 0, 0]
    assert x.packed[SLOT].tolist() == [3 * 4 + 1, 9 * 4, 6 * 4, -1, -1]
    assert x.packed[LENGTH].tolist() == [6, 1, 9, 0, 0]
    assert x.block_tables.tolist() == [[7, 3, 0], [9, 0, 0], [1, 2, 6], [0, 0, 0], [0, 0, 0]]
    assert x.packed.dtype == x.block_tables.dtype == torch.int64


def test_prepare_decode_rejects_too_few_rows():
    with pytest.raises(ValueError, match="do not fit"):
        prepare_decode([seq([1], 0, [0]), seq([2], 0, [1])], 16, padded=1)


def test_is_pure_decode():
    assert is_pure_decode([seq([1], 3, [0]), seq([2], 0, [1])])
    assert not is_pure_decode([seq([1], 3, [0]), seq([2, 3], 0, [1])])
    assert not is_pure_decode([])


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert bucket_sizes(400)[-4:] == [256, 320, 384, 400]
