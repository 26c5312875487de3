"""Run by tests/test_distributed.py under torchrun (two CPU processes, gloo): `lm_head` under FSDP2.

A head that FSDP keeps unsharded after the forward is used as it is and FSDP averages its gradient over
the processes (checked on a toy model, and on the tiny LLaVA fully fine-tuned through the fused loss and
sharded as accelerate 1.15 does: one unit per decoder layer, `[final norm, lm_head]` not resharded after
the forward); a head resharded after the forward is gathered when frozen and refused when trained.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from mdpo_fast.cli import parse_config
from mdpo_fast.collate import PaddedCollator
from mdpo_fast.data import prepare_dataset
from mdpo_fast.demo_data import demo_records
from mdpo_fast.modeling import lm_head, padded_answer_tokens
from mdpo_fast.ops.fused_loss import fused_linear_mdpo_loss
from mdpo_fast.ops.logprobs import linear_token_logprobs
from mdpo_fast.tiny import build_tiny_model

H, V, N = 8, 20, 5


class Toy(nn.Module):
    """A body and an LM head applied to no position in the forward, as `last_hidden_states` runs a model."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(H, H), nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        hidden = self.body(x)
        self.head(hidden[:0])
        return hidden


def _data(rank: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)


def _loss(model, x, labels, weight=None):
    hidden = model(x)
    weight = lm_head(model)[0] if weight is None else weight
    return -linear_token_logprobs(hidden, weight, labels).sum()


def _tiny_model_full_finetuning(rank: int, world: int) -> None:
    model, processor = build_tiny_model()
    model.train()
    single = copy.deepcopy(model)
    args = parse_config([], {"output_dir": "unused", "use_cpu": True, "report_to": "none"})
    dataset = prepare_dataset(args, processor, records=demo_records(n=2 * world, seed=4), source="demo")
    collate = PaddedCollator(processor.tokenizer.pad_token_id)
    ref_logps = torch.full((2, 3), -50.0)

    def loss(m, r):
        tokens = padded_answer_tokens(m, collate([dataset[2 * r], dataset[2 * r + 1]]))
        weight, bias = lm_head(m)
        return fused_linear_mdpo_loss(tokens.hidden, weight, tokens.labels, tokens.segment_ids, ref_logps, bias=bias,
                                      num_examples=tokens.num_examples)[0]

    text = model.model.language_model
    for layer in text.layers:
        fully_shard(layer)
    fully_shard(text.embed_tokens)
    fully_shard([text.norm, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    loss(model, rank).backward()
    sharded = dict(model.named_parameters())
    names = [n for n in sharded if "lm_head" in n or "layers.0.mlp" in n or "embed_tokens" in n]
    assert len(names) >= 4, names
    wants = torch.autograd.grad(sum(loss(single, r) for r in range(world)) / world,
                                [dict(single.named_parameters())[n] for n in names])
    for name, want in zip(names, wants, strict=True):
        torch.testing.assert_close(sharded[name].grad.full_tensor(), want, rtol=1e-4, atol=1e-6, msg=name)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = Toy()
    single = Toy()
    single.load_state_dict(model.state_dict())
    fully_shard(model)  # the head in the root module, which FSDP does not reshard after the forward
    _loss(model, *_data(rank)).backward()
    want = sum(torch.autograd.grad(_loss(single, *_data(r)), single.head.weight)[0] for r in range(world)) / world
    torch.testing.assert_close(model.head.weight.grad.full_tensor(), want)

    for frozen in (True, False):
        torch.manual_seed(0)
        model = Toy()
        full = model.head.weight.detach().clone()
        model.head.requires_grad_(not frozen)
        fully_shard(model.head)
        fully_shard(model)
        model(_data(rank)[0])
        if frozen:
            torch.testing.assert_close(lm_head(model)[0], full, rtol=0, atol=0)
        else:
            try:
                lm_head(model)
            except ValueError as e:
                assert "cannot train an LM head that FSDP reshards after the forward" in str(e), e
            else:
                raise AssertionError("a trained, separately sharded head was not refused")
    _tiny_model_full_finetuning(rank, world)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()  # no process tears gloo down while the other still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
