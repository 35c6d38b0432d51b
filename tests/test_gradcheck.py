"""gw.gradcheck: wrong backwards are caught and named; correct models pass; the model is kept."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.cli import main


class HalfSquare(torch.autograd.Function):
    """x² with a backward that forgets the factor 2."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x  # wrong on purpose: d(x²)/dx = 2x


class Square(nn.Module):
    def forward(self, x):
        return HalfSquare.apply(x)


class WrongWeightLinear(torch.autograd.Function):
    """y = x Wᵀ + b; the input gradient is right, the weight gradient is scaled by 3."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, 3 * grad.T @ x, grad.sum(0)


class CustomLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return WrongWeightLinear.apply(x, self.weight, self.bias)


def test_a_wrong_custom_function_in_the_middle_is_the_only_culprit():
    model = nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), Square()), nn.Linear(8, 3)
    )
    report = gw.gradcheck(model, torch.randn(4, 5))
    assert not report.ok
    assert report.culprits == ["2.1"]
    statuses = {r.name: r.status for r in report.rows if r.kind == "module"}
    assert statuses["2.1"] == statuses["2"] == statuses[""] == "mismatch"  # parents disagree too
    assert statuses["3"] == statuses["0"] == "ok"
    assert str(report).startswith("gradcheck: WRONG BACKWARD in '2.1'")


def test_a_wrong_weight_gradient_names_the_layer():
    model = nn.Sequential(
        nn.Linear(5, 8), nn.GELU(), CustomLinear(8, 6), nn.GELU(), nn.Linear(6, 2)
    )
    report = gw.gradcheck(model, torch.randn(4, 5))
    assert report.culprits == ["2"]
    params = {r.name: r.status for r in report.rows if r.kind == "parameter"}
    assert params["2.weight"] == "mismatch"
    assert params["2.bias"] == params["0.weight"] == "ok"  # its input gradient is right


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, (h, _) = self.lstm(x)
        return self.head(out[:, -1]) + h.sum() * 0.1


def correct_models():
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.2, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    )
    return {
        "mlp_gelu_tanh": (
            nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)),
            torch.randn(4, 5),
        ),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(4 * 3 * 3, 3),
            ),
            torch.randn(2, 3, 8, 8),
        ),
        "transformer_train_dropout": (encoder.train(), torch.randn(2, 5, 16)),
        "lstm": (LSTMHead(), torch.randn(2, 6, 4)),
    }


@pytest.mark.parametrize("name", list(correct_models()))
def test_correct_models_pass_with_no_culprit(name):
    model, inputs = correct_models()[name]
    report = gw.gradcheck(model, inputs)
    assert report.ok, str(report)
    assert report.culprits == []
    assert sum(r.status == "ok" for r in report.rows) > len(report.rows) / 2


def hugging_face_model(family: str) -> nn.Module:
    """A tiny random-init model of `family` with its default config otherwise (use_cache=True for
    the decoders, BERT's padding_idx=0), in train mode; no download."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tiny = {"vocab_size": 100, "max_position_embeddings": 32}
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    elif family == "llama":
        config = transformers.LlamaConfig(
            **tiny, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            **tiny, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64,
        )  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    return model.train()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hugging_face_models_with_default_configs_and_pad_tokens_pass(family):
    model = hugging_face_model(family)
    if family != "gpt2":
        assert model.config.use_cache is not False or family == "bert"
    ids = torch.tensor([[5, 7, 9, 0, 0], [3, 2, 8, 4, 0]])  # 0 is the pad token
    inputs = (ids,) if family == "gpt2" else (ids, (ids != 0).long())
    report = gw.gradcheck(model, inputs)
    assert report.ok, str(report)
    assert report.culprits == []
    assert sum(r.status == "ok" for r in report.rows) > 10
    if family == "bert":  # the padding row of the word embeddings is left out, and said so
        assert any("word_embeddings.weight: row 0 (padding_idx)" in n for n in report.notes)
        (row,) = [r for r in report.rows if r.name == "bert.embeddings.word_embeddings.weight"]
        assert row.status == "ok"


def test_a_model_that_keeps_a_tensor_with_graph_is_copied_and_checked():
    class Remembers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)
            self.last_output = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.last_output = self.layer(x)  # keeps the graph of the last forward
            return self.last_output

    model = Remembers()
    model(torch.randn(2, 4))
    assert model.last_output.grad_fn is not None
    report = gw.gradcheck(model, torch.randn(2, 4))
    assert report.ok and report.culprits == []
    assert model.last_output.dtype == torch.float32  # the user's model is untouched


def test_a_module_that_cannot_be_rerun_is_inconclusive_with_the_reason():
    class NeedsParent(nn.Module):
        active = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.active:
                raise RuntimeError("called outside its parent")
            return x * 2

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = NeedsParent()
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inner.active = True
            try:
                return self.head(self.inner(x))
            finally:
                self.inner.active = False

    report = gw.gradcheck(Parent(), torch.randn(3, 4))
    assert report.ok and report.culprits == []
    (row,) = [r for r in report.rows if r.name == "inner"]
    assert row.status == "inconclusive"
    assert "could not re-run it" in row.reason and "called outside its parent" in row.reason


def test_relu_at_its_kinks_is_inconclusive_not_a_mismatch():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # every pre-activation is exactly 0: the ReLU's kink
    report = gw.gradcheck(model, torch.randn(4, 5))
    assert report.ok and report.culprits == []
    kinked = [r for r in report.rows if r.status == "inconclusive"]
    assert {"0.weight", "1"} <= {r.name for r in kinked}
    assert all("kink" in r.reason for r in kinked), str(report)


def test_a_cast_to_lower_precision_is_inconclusive_with_a_rounding_reason():
    class Rounds(nn.Module):
        def forward(self, x):
            return torch.sin(x.float()).double()  # float32 inside a float64 check

    model = nn.Sequential(nn.Linear(5, 8), Rounds(), nn.Linear(8, 3))
    report = gw.gradcheck(model, torch.randn(4, 5))
    rounded = next(r for r in report.rows if r.name == "1")
    assert rounded.status == "inconclusive" and "rounding" in rounded.reason
    assert report.ok


def test_the_users_model_is_untouched():
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    hook = model.register_forward_hook(lambda *a: None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gw.gradcheck(model, torch.randn(4, 5))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].weight.grad is None
    assert list(model._forward_hooks) == [hook.id]


def test_cost_grows_with_tensors_and_modules_not_parameters():
    def mlp(width, depth):
        layers = [nn.Linear(4, width), nn.Tanh()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(width, 2))

    narrow = gw.gradcheck(mlp(4, 2), torch.randn(3, 4)).evaluations
    wide = gw.gradcheck(mlp(64, 2), torch.randn(3, 4)).evaluations
    deep = gw.gradcheck(mlp(4, 4), torch.randn(3, 4)).evaluations
    assert narrow == wide
    assert deep > narrow


def test_bad_input_is_refused_clearly():
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        gw.gradcheck("model", torch.randn(2))
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        gw.gradcheck(nn.Linear(2, 2), torch.randn(3, 2), loss_fn=lambda out: out)


FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return grad  # wrong: should be 2 * grad

    class Doubler(nn.Module):
        def forward(self, x):
            return Twice.apply(x)

    def wrong():
        return nn.Sequential(nn.Linear(3, 4), Doubler(), nn.Linear(4, 2)), torch.randn(2, 3)

    def right():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (torch.randn(2, 3),)
    """
)


def test_cli_gradcheck_exit_codes(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["gradcheck", "user_models:right"]) == 0
    assert main(["gradcheck", "user_models:wrong"]) == 1
    assert "WRONG BACKWARD in '1'" in capsys.readouterr().out
    assert main(["gradcheck", "user_models"]) == 2
    assert main(["gradcheck", "user_models:missing"]) == 2
    assert "cannot load" in capsys.readouterr().err
    sys.modules.pop("user_models", None)
