"""torch.func.vmap over the public vlkernels.nn modules on the torch path (and the default backend):
vmap(module)(batch) equals the module applied to each sample, as for torch's own modules; what
cannot be batched (a VisualDictionary training step updates its buffers in place) refuses clearly."""
import pytest
import torch
from torch.func import vmap

import vlkernels
from vlkernels import nn as vnn

D, H, B = 16, 2, 3

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # SDPA's vmap by a loop
    pytest.mark.filterwarnings("ignore::vlkernels.FallbackWarning"),  # need_weights=True runs torch's path
]


def _rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _mask(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(7)) < 0.7


# name: (module, the batched inputs [B, ...], the call on one sample's inputs)
CASES = {
    "VisualDictionary": (lambda: vnn.VisualDictionary(6, D), lambda: (_rand(B, 2, 5, D),), lambda m, x: m(x)),
    "PatchEmbed": (lambda: vnn.PatchEmbed(8, 4, 3, D), lambda: (_rand(B, 2, 3, 8, 8),), lambda m, x: m(x)),
    "VLMultiheadAttention": (lambda: vnn.VLMultiheadAttention(D, H), lambda: (_rand(B, 2, 5, D), _mask(B, 2, 5)),
                             lambda m, x, mask: m(x, key_padding_mask=mask)),
    "MultiheadAttention": (lambda: vnn.MultiheadAttention(D, H, batch_first=True),
                           lambda: (_rand(B, 2, 5, D), _rand(B, 2, 4, D)),
                           lambda m, q, kv: m(q, kv, kv, need_weights=False)[0]),
    "MultiheadAttention with weights": (lambda: vnn.MultiheadAttention(D, H),
                                        lambda: (_rand(B, 5, 2, D), _rand(B, 4, 2, D)),
                                        lambda m, q, kv: m(q, kv, kv)),
    "VLMoAttention": (lambda: vnn.VLMoAttention(D, H), lambda: (_rand(B, 2, 5, D), _mask(B, 2, 5)),
                      lambda m, x, mask: m(x, mask)),
    "PostLNAttention": (lambda: vnn.PostLNAttention(D, H), lambda: (_rand(B, 2, 5, D),), lambda m, x: m(x)),
    "BertLayer": (lambda: vnn.BertLayer(D, H, 32), lambda: (_rand(B, 2, 5, D), _mask(B, 2, 5)),
                  lambda m, x, mask: m(x, mask)),
    "LXMERTCrossLayer": (lambda: vnn.LXMERTCrossLayer(D, H, 32), lambda: (_rand(B, 2, 5, D), _rand(B, 2, 4, D)),
                         lambda m, lang, visn: m(lang, visn)),
    "WRALoss": (lambda: vnn.WRALoss(iters=5), lambda: (_rand(B, 2, 5, D), _rand(B, 2, 4, D)),
                lambda m, txt, img: m(txt, img, None, None, torch.tensor([1, 0]))),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_equals_the_module_on_each_sample(name, backend):
    build, inputs, call = CASES[name]
    torch.manual_seed(0)
    module = build().eval()
    batched = inputs()
    with vlkernels.use_backend(backend):
        actual = vmap(lambda *xs: call(module, *xs))(*batched)
        expected = [call(module, *(x[i] for x in batched)) for i in range(B)]
    expected = torch.utils._pytree.tree_map(lambda *samples: torch.stack(samples), *expected)
    torch.testing.assert_close(actual, expected)


def test_visual_dictionary_training_step_refuses_vmap_clearly():
    module = vnn.VisualDictionary(6, D).train()
    before = module.embed.clone()
    with pytest.raises(RuntimeError, match="VisualDictionary: a training step updates the dictionary's buffers "
                                           "in place.*vmap it in eval mode"):
        vmap(module)(_rand(B, 5, D))
    torch.testing.assert_close(module.embed, before, rtol=0, atol=0)  # refused before any update
