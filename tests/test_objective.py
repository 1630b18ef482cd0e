"""DistillationLoss: the total is the weighted sum of its terms, each equal to its own function.

Every value is checked against a direct float64 formula or the underlying fastkd function
on the same inputs, and every gradient against autograd through that formula. Hugging
Face outputs are emulated with ``types.SimpleNamespace`` and dicts (no transformers).
"""
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.objective import DistillationLoss

B, L, HS, HT, V, LAYERS = 3, 5, 6, 8, 13, 2


def make_case(seed=0, dtype=torch.float64):
    """Student/teacher/helper outputs of a 2-layer "model": hidden states per layer, LM heads, logits."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    c = NS()
    c.s_states = [randn(B, L, HS, grad=True) for _ in range(LAYERS + 1)]
    c.t_states = [randn(B, L, HT) for _ in range(LAYERS + 1)]
    c.h_states = [randn(B, L, HT) for _ in range(LAYERS + 1)]
    c.s_head, c.t_head, c.h_head = randn(V, HS, grad=True), randn(V, HT), randn(V, HT)
    c.s_logits = c.s_states[-1] @ c.s_head.T
    c.t_logits = c.t_states[-1] @ c.t_head.T
    c.h_logits = c.h_states[-1] @ c.h_head.T
    c.labels = torch.randint(0, V, (B, L), generator=g)
    c.labels[0, :2] = -100                                         # ignored tokens
    c.student = NS(logits=c.s_logits, hidden_states=tuple(c.s_states))
    c.teacher = NS(logits=c.t_logits, hidden_states=tuple(c.t_states))
    c.helper = NS(logits=c.h_logits, hidden_states=tuple(c.h_states))
    c.params = [*c.s_states, c.s_head]                             # the student's leaves
    return c


def direct_kd(s, t, labels, temperature=1.0, alpha=1.0, ignore_index=-100):
    """alpha T^2 KL(p||q) + (1 - alpha) CE, mean over valid tokens: the formula, in float64."""
    s, t = s.double(), t.double()
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    valid = labels != ignore_index
    ce = -F.log_softmax(s, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    per_token = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


def grads(value, params):
    return torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)


def assert_close(a, b, tol=1e-10):
    if a is None or b is None:                 # a leaf no term reads: no gradient on either side
        assert a is None and b is None, (a, b)
        return
    assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol), (a, b)


# fused_linear_kd_loss sums its float64 loss in an fp32 buffer and scales its float64
# gradients by an fp32 1/valid-tokens: both are compared at fp32 precision.
FUSED_TOL = 1e-6


# ---------------------------------------------------------------------------- logits terms

def test_logits_term_is_kd_loss():
    c = make_case()
    obj = DistillationLoss(temperature=2.0, alpha=0.7, weights={"logits": 0.5})
    total, terms = obj(c.student, c.teacher, c.labels)
    expected = direct_kd(c.s_logits, c.t_logits, c.labels, 2.0, 0.7)
    assert set(terms) == {"logits", "total"}
    assert_close(terms["logits"], expected)
    assert_close(total, 0.5 * expected)
    assert_close(terms["total"], total)
    for g, ref in zip(grads(total, c.params), grads(0.5 * expected, c.params)):
        assert_close(g, ref)


def test_helper_is_a_second_logits_term_with_alpha_one_by_default():
    c = make_case(1)
    obj = DistillationLoss(temperature=1.5, alpha=0.6, helper=True, weights={"logits": 0.8, "helper": 0.3})
    total, terms = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper)
    main = direct_kd(c.s_logits, c.t_logits, c.labels, 1.5, 0.6)
    assistant = direct_kd(c.s_logits, c.h_logits, c.labels, 1.5, 1.0)   # CE counted once, in "logits"
    assert_close(terms["logits"], main)
    assert_close(terms["helper"], assistant)
    expected = 0.8 * main + 0.3 * assistant
    assert_close(total, expected)
    for g, ref in zip(grads(total, c.params), grads(expected, c.params)):
        assert_close(g, ref)


def test_helper_settings_override():
    c = make_case(2)
    obj = DistillationLoss(temperature=2.0, helper={"temperature": 1.0, "divergence": "reverse_kl"})
    _, terms = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper)
    expected = fastkd.reference.kd_loss(c.s_logits, c.h_logits, c.labels, divergence="reverse_kl", temperature=1.0)
    assert_close(terms["helper"], expected)


def test_fused_linear_equals_dense_on_the_materialised_logits():
    c = make_case(3)
    obj = DistillationLoss(fused_linear=True, temperature=2.0, alpha=0.5, helper=True,
                           weights={"helper": 0.25})
    total, terms = obj({"hidden_states": tuple(c.s_states)}, NS(last_hidden_state=c.t_states[-1]), c.labels,
                       helper_outputs=NS(hidden_states=tuple(c.h_states)),
                       student_lm_head=c.s_head,
                       teacher_lm_head=c.t_head, helper_lm_head=NS(weight=c.h_head, bias=None))
    main = direct_kd(c.s_logits, c.t_logits, c.labels, 2.0, 0.5)
    assistant = direct_kd(c.s_logits, c.h_logits, c.labels, 2.0, 1.0)
    assert_close(terms["logits"], main, FUSED_TOL)
    assert_close(terms["helper"], assistant, FUSED_TOL)
    expected = main + 0.25 * assistant
    assert_close(total, expected, FUSED_TOL)
    for g, ref in zip(grads(total, c.params), grads(expected, c.params)):
        assert_close(g, ref, FUSED_TOL)


def test_fused_linear_takes_lm_head_modules_with_bias():
    torch.manual_seed(0)
    s_head, t_head = torch.nn.Linear(HS, V).double(), torch.nn.Linear(HT, V).double()
    hs = torch.randn(B, L, HS, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, L, HT, dtype=torch.float64)
    obj = DistillationLoss(fused_linear=True)
    total, _ = obj(NS(last_hidden_state=hs), NS(last_hidden_state=ht), student_lm_head=s_head,
                   teacher_lm_head=t_head)
    with torch.no_grad():
        t_logits = t_head(ht)
    expected = direct_kd(s_head(hs), t_logits, torch.zeros(B, L, dtype=torch.long))
    assert_close(total, expected, FUSED_TOL)
    params = [hs, s_head.weight, s_head.bias]
    for g, ref in zip(grads(total, params), grads(expected, params)):
        assert_close(g, ref, FUSED_TOL)
    assert t_head.weight.grad is None


def test_inplace_backward_runs_the_logits_term_last():
    # The helper term reads the student's logits; the in-place logits term must not have
    # overwritten them yet.
    c = make_case(4, dtype=torch.float32)
    s_logits = c.s_logits.detach().requires_grad_()
    expected_grads = []
    for inplace in (False, True):
        obj = DistillationLoss(helper=True, alpha=0.5, inplace_backward=inplace, weights={"helper": 0.5})
        logits = s_logits * 1.0                                    # a non-leaf, as a model's output
        total, terms = obj(logits, c.t_logits, c.labels, helper_outputs=c.h_logits)
        expected_grads.append((terms["helper"], torch.autograd.grad(total, s_logits)[0]))
    (h0, g0), (h1, g1) = expected_grads
    assert torch.equal(h0, h1)
    assert torch.allclose(g0, g1, rtol=1e-6, atol=1e-7)


def test_gradcheck_whole_objective_float64():
    c = make_case(5)
    # The fused backends keep one gradient and cannot be backpropagated twice, as gradcheck
    # does; the reference backend ("torch") runs the same objective with plain autograd.
    obj = DistillationLoss(temperature=2.0, alpha=0.5, helper=True, weights={"helper": 0.3}, backend="torch")

    s_logits, t_logits, h_logits = (x[:2, :3, :7].detach() for x in (c.s_logits, c.t_logits, c.h_logits))
    labels = c.labels[:2, :3].clamp_max(6)                        # small: gradcheck is O(inputs)

    def total(s_logits):
        return obj(s_logits, t_logits, labels, helper_outputs=h_logits)[0]

    assert torch.autograd.gradcheck(total, (s_logits.requires_grad_(),))


# ---------------------------------------------------------------------------- outputs forms

def test_outputs_as_namespace_dict_or_tensor_give_the_same_total():
    c = make_case(6)
    obj = DistillationLoss(alpha=0.5)
    forms = [(c.student, c.teacher), ({"logits": c.s_logits, "loss": None}, {"logits": c.t_logits}),
             (c.s_logits, c.t_logits)]
    totals = [obj(s, t, c.labels)[0] for s, t in forms]
    for t in totals[1:]:
        assert torch.equal(t, totals[0])


def test_terms_are_detached_and_total_is_not():
    c = make_case(7)
    obj = DistillationLoss(helper=True)
    total, terms = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper)
    assert total.requires_grad
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())
    assert list(terms) == ["logits", "helper", "total"]


def test_shift_labels_scores_position_i_against_token_i_plus_1():
    c = make_case(8)
    obj = DistillationLoss(alpha=0.5, shift_labels=True)
    total, _ = obj(c.student, c.teacher, c.labels)
    shifted = torch.cat([c.labels[:, 1:], torch.full((B, 1), -100)], 1)
    assert_close(total, direct_kd(c.s_logits, c.t_logits, shifted, 1.0, 0.5))


def test_num_items_replaces_the_mean_denominator():
    c = make_case(9)
    obj = DistillationLoss()
    total, _ = obj(c.student, c.teacher, c.labels, num_items=40)
    valid = (c.labels != -100).sum()
    assert_close(total, direct_kd(c.s_logits, c.t_logits, c.labels) * valid / 40)


# ---------------------------------------------------------------------------- schedules

def test_schedules_follow_the_step_count():
    c = make_case(10)
    obj = DistillationLoss(helper=True, weights={"helper": lambda step: 0.1 * step, "logits": 2.0})
    base = direct_kd(c.s_logits, c.t_logits, c.labels)
    assistant = direct_kd(c.s_logits, c.h_logits, c.labels)
    seen = []
    for step in range(3):
        total, _ = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper)
        seen.append(obj.current_weights()["helper"])
        assert_close(total, 2.0 * base + 0.1 * step * assistant)
        assert obj.step() == step + 1
    assert seen == [0.0, 0.1, 0.2]
    # step= (a trainer's global step) sets the count; gradient accumulation repeats it.
    total, _ = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper, step=7)
    assert obj.current_step == 7
    assert_close(total, 2.0 * base + 0.7 * assistant)
    assert obj.current_weights(step=20)["helper"] == pytest.approx(2.0)
    assert obj.current_step == 7


def test_step_count_is_saved_and_restored():
    obj = DistillationLoss()
    obj.step(5)
    state = obj.state_dict()
    fresh = DistillationLoss()
    fresh.load_state_dict(state)
    assert fresh.current_step == 5


def test_zero_weight_still_computes_the_term():
    c = make_case(11)
    obj = DistillationLoss(helper=True, weights={"helper": lambda step: 0.0})
    total, terms = obj(c.student, c.teacher, c.labels, helper_outputs=c.helper)
    assert_close(terms["helper"], direct_kd(c.s_logits, c.h_logits, c.labels))
    assert_close(total, terms["logits"])


# ---------------------------------------------------------------------------- errors

def test_teacher_that_requires_grad_is_refused():
    c = make_case(12)
    obj = DistillationLoss()
    with pytest.raises(ValueError, match="teacher_outputs.*torch.no_grad"):
        obj(c.student, NS(logits=c.t_logits.requires_grad_()), c.labels)


def test_helper_errors():
    c = make_case(13)
    with pytest.raises(ValueError, match="helper_outputs="):
        DistillationLoss(helper=True)(c.student, c.teacher, c.labels)
    with pytest.raises(ValueError, match="no helper term"):
        DistillationLoss()(c.student, c.teacher, c.labels, helper_outputs=c.helper)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        DistillationLoss(helper={"temprature": 2.0})
    with pytest.raises(TypeError, match="helper must be"):
        DistillationLoss(helper="yes")


@pytest.mark.parametrize("labels_shape", [(B, L + 1), (B * L,), (B, L, 1)])
def test_labels_shape_mismatch(labels_shape):
    c = make_case(14)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 5\)"):
        DistillationLoss()(c.student, c.teacher, torch.zeros(labels_shape, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        DistillationLoss()(c.student, c.teacher, [[0] * L] * B)


def test_output_errors():
    c = make_case(15)
    obj = DistillationLoss()
    with pytest.raises(ValueError, match="unknown key 'logit'"):
        obj({"logit": c.s_logits}, c.teacher)
    with pytest.raises(TypeError, match="return_dict=False"):
        obj((c.s_logits,), c.teacher)
    with pytest.raises(ValueError, match="teacher_outputs has no logits"):
        obj(c.student, NS(hidden_states=tuple(c.t_states)))
    with pytest.raises(TypeError, match="hidden_states must be a tuple of tensors"):
        obj(NS(logits=c.s_logits, hidden_states=c.s_states[0]), c.teacher)
    with pytest.raises(TypeError, match="student_outputs must be"):
        obj(None, c.teacher)


def test_fused_linear_errors():
    c = make_case(16)
    with pytest.raises(ValueError, match="student_lm_head is only used with fused_linear=True"):
        DistillationLoss()(c.student, c.teacher, student_lm_head=c.s_head)
    obj = DistillationLoss(fused_linear=True)
    with pytest.raises(ValueError, match="needs teacher_lm_head="):
        obj(c.student, c.teacher, student_lm_head=c.s_head)
    with pytest.raises(ValueError, match="neither last_hidden_state nor hidden_states"):
        obj(c.student, NS(logits=c.t_logits), student_lm_head=c.s_head, teacher_lm_head=c.t_head)
    with pytest.raises(TypeError, match="student_lm_head must be a module with a .weight"):
        obj(c.student, c.teacher, student_lm_head="head", teacher_lm_head=c.t_head)
    with pytest.raises(ValueError, match="chunk_size applies to fused_linear=True only"):
        DistillationLoss(chunk_size=64)


def test_construction_errors():
    with pytest.raises(ValueError, match="weights has unknown term 'feature'"):
        DistillationLoss(weights={"feature": 1.0})
    with pytest.raises(ValueError, match=r"weights\['logits'\] must be >= 0"):
        DistillationLoss(weights={"logits": -1.0})
    with pytest.raises(TypeError, match=r"weights\['logits'\] must be a real number"):
        DistillationLoss(weights={"logits": "1"})
    with pytest.raises(ValueError, match="reduction='none'"):
        DistillationLoss(reduction="none")
    with pytest.raises(ValueError, match="no term"):
        DistillationLoss(logits=False)
    with pytest.raises(ValueError, match="neither is on"):
        DistillationLoss(logits=False, features=torch.nn.Identity(), temperature=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        DistillationLoss(temprature=2.0)
    with pytest.raises(ValueError, match="used twice"):
        DistillationLoss(features={"a": torch.nn.Identity()}, relations={"a": torch.nn.Identity()})
    with pytest.raises(ValueError, match="reserved"):
        DistillationLoss(features={"total": torch.nn.Identity()})
    with pytest.raises(TypeError, match="features must be an nn.Module"):
        DistillationLoss(features=lambda s, t: 0)


def test_schedule_values_are_checked_when_used():
    c = make_case(17)
    obj = DistillationLoss(weights={"logits": lambda step: -0.5 if step > 0 else 1.0})
    obj(c.student, c.teacher)
    obj.step()
    with pytest.raises(ValueError, match=r"weights\['logits'\]\(1\).*must be >= 0"):
        obj(c.student, c.teacher)
    with pytest.raises(TypeError, match="step must be an int"):
        obj(c.student, c.teacher, step=torch.tensor(3))
    with pytest.raises(ValueError, match="step must be >= 0"):
        obj(c.student, c.teacher, step=-1)


def test_non_scalar_term_is_refused():
    class PerToken(torch.nn.Module):
        def forward(self, s, t, labels=None, num_items=None):
            return (s[-1] - 0).sum(-1)

    c = make_case(18)
    obj = DistillationLoss(logits=False, features=PerToken())
    with pytest.raises(ValueError, match=r"term 'features' returned \(3, 5\), not a scalar"):
        obj(c.student, c.teacher, c.labels)


# ---------------------------------------------------------------------------- relation terms

def direct_rkd_distance(s_hidden, t_hidden, valid):
    """RKD distance on masked mean-pooled embeddings, written out in float64 (Park et al., eq. 3-4)."""
    def pool(h):
        w = valid[..., None].double()
        return (h.double() * w).sum(1) / w.sum(1).clamp_min(1)

    def normalised_distances(e):
        i, j = torch.triu_indices(e.shape[0], e.shape[0], 1)
        d = (e[i] - e[j]).norm(dim=-1)
        return d / d.mean()

    return F.smooth_l1_loss(normalised_distances(pool(s_hidden)), normalised_distances(pool(t_hidden)).detach())


def test_relation_term_is_rkd_on_pooled_hidden_states():
    from fastkd.relations import RelationDistillation, pool_hidden_states, rkd_angle_loss

    c = make_case(20)
    obj = DistillationLoss(alpha=0.5, relations=RelationDistillation([("rkd_distance", 1.0), ("rkd_angle", 2.0)]),
                           weights={"relations": 0.3})
    total, terms = obj(c.student, c.teacher, c.labels)
    valid = c.labels != -100
    angle = rkd_angle_loss(pool_hidden_states(c.s_states[-1], c.labels), pool_hidden_states(c.t_states[-1], c.labels))
    relation = direct_rkd_distance(c.s_states[-1], c.t_states[-1], valid) + 2.0 * angle
    logits = direct_kd(c.s_logits, c.t_logits, c.labels, 1.0, 0.5)
    assert_close(terms["relations"], relation)
    assert_close(terms["logits"], logits)
    expected = logits + 0.3 * relation
    assert_close(total, expected)
    for g, ref in zip(grads(total, c.params), grads(expected, c.params)):
        assert_close(g, ref)


def test_relation_layers_and_another_ignore_index():
    from fastkd.relations import RelationDistillation

    c = make_case(21)
    labels = c.labels.masked_fill(c.labels == -100, 7)             # 7 is this objective's ignore_index
    obj = DistillationLoss(logits=False, ignore_index=7,
                           relations={"mid": RelationDistillation("rkd_distance"),
                                      "top": RelationDistillation("rkd_distance")},
                           relation_layers={"mid": (1, 2)}, weights={"top": 0.5})
    total, terms = obj(c.student, c.teacher, labels)
    valid = labels != 7
    mid = direct_rkd_distance(c.s_states[1], c.t_states[2], valid)
    top = direct_rkd_distance(c.s_states[-1], c.t_states[-1], valid)
    assert_close(terms["mid"], mid)
    assert_close(terms["top"], top)
    assert_close(total, mid + 0.5 * top)
    assert obj.relation_layers == {"mid": (1, 2), "top": (-1, -1)}


def test_relation_term_needs_hidden_states():
    from fastkd.relations import RelationDistillation

    c = make_case(22)
    obj = DistillationLoss(relations=RelationDistillation("similarity"), relation_layers=(1, 1))
    with pytest.raises(ValueError, match="student_outputs has no hidden_states.*output_hidden_states=True"):
        obj(NS(logits=c.s_logits), c.teacher, c.labels)
    with pytest.raises(ValueError, match="reads layer 5 of teacher_outputs.hidden_states, which has 3 entries"):
        DistillationLoss(relations=RelationDistillation("similarity"), relation_layers=(1, 5))(
            c.student, c.teacher, c.labels)
    with pytest.raises(ValueError, match="relation_layers has unknown term 'x'"):
        DistillationLoss(relations=RelationDistillation("similarity"), relation_layers={"x": (1, 1)})
    with pytest.raises(TypeError, match="relation_layers must be a pair"):
        DistillationLoss(relations=RelationDistillation("similarity"), relation_layers=3)


# ---------------------------------------------------------------------------- feature terms

def direct_feature(s_states, t_states, projections, pairs, valid, kind):
    """Mean over layer pairs of the per-token distance between W s_i and t_j, mean over valid tokens."""
    total = 0.0
    for (i, j), weight in zip(pairs, projections):
        s, t = s_states[i].double() @ weight.double().T, t_states[j].double()
        if kind == "mse":
            per_token = ((s - t) ** 2).sum(-1)
        else:                                                       # cosine
            per_token = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
        total = total + (per_token * valid).sum() / valid.sum().clamp_min(1)
    return total / len(pairs)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_term_is_feature_loss_through_the_projections(kind):
    from fastkd.features import FeatureDistillation, feature_loss

    c = make_case(30)
    torch.manual_seed(0)
    features = FeatureDistillation({1: 1, 2: 2}, HS, HT, kind=kind).double()
    obj = DistillationLoss(alpha=0.5, temperature=2.0, features=features, weights={"features": 0.2})
    total, terms = obj(c.student, c.teacher, c.labels)
    projections = [p.weight for p in features.projections]
    assert len(projections) == 2 and all(p.requires_grad for p in projections)
    valid = c.labels != -100
    feature = direct_feature(c.s_states, c.t_states, projections, [(1, 1), (2, 2)], valid, kind)
    # The underlying function, with the projection applied by hand, gives the same value.
    by_function = sum(feature_loss(c.s_states[i] @ w.T, c.t_states[i], c.labels, kind=kind)
                      for i, w in zip((1, 2), projections)) / 2
    logits = direct_kd(c.s_logits, c.t_logits, c.labels, 2.0, 0.5)
    assert_close(terms["features"], feature)
    assert_close(by_function, feature)
    assert_close(terms["logits"], logits)
    expected = logits + 0.2 * feature
    assert_close(total, expected)
    params = c.params + projections
    for g, ref in zip(grads(total, params), grads(expected, params)):
        assert_close(g, ref)


def test_projections_are_parameters_and_get_gradients_teacher_gets_none():
    from fastkd.features import FeatureDistillation
    from fastkd.relations import RelationDistillation

    class Tiny(torch.nn.Module):                     # a 2-layer "model" with HF-like outputs
        def __init__(self, width):
            super().__init__()
            self.emb = torch.nn.Embedding(V, width)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(LAYERS)])
            self.lm_head = torch.nn.Linear(width, V, bias=False)

        def forward(self, ids, output_hidden_states=False):
            states = [self.emb(ids)]
            for layer in self.layers:
                states.append(torch.tanh(layer(states[-1])))
            return NS(logits=self.lm_head(states[-1]), hidden_states=tuple(states) if output_hidden_states else None)

    torch.manual_seed(0)
    student, teacher = Tiny(HS), Tiny(HT)
    features = FeatureDistillation({1: 1, -1: -1}, HS, HT, kind="mse")
    obj = DistillationLoss(alpha=0.5, features=features, relations=RelationDistillation("similarity"))
    projection_ids = {id(p) for p in features.projections.parameters()}
    assert projection_ids and projection_ids == {id(p) for p in obj.parameters()}
    ids = torch.randint(0, V, (B, L))
    with torch.no_grad():
        out_t = teacher(ids, output_hidden_states=True)
    total, terms = obj(student(ids, output_hidden_states=True), out_t, ids)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert set(terms) == {"logits", "features", "relations", "total"}


def test_feature_term_needs_hidden_states():
    from fastkd.features import FeatureDistillation

    c = make_case(31)
    obj = DistillationLoss(features=FeatureDistillation({1: 1}, HS, HT))
    with pytest.raises(ValueError, match=r"student_outputs has no hidden_states, which feature term 'features' "
                                         r"needs: call the model with output_hidden_states=True"):
        obj(NS(logits=c.s_logits, hidden_states=None), c.teacher, c.labels)
    with pytest.raises(ValueError, match="teacher_outputs has no hidden_states"):
        obj(c.student, {"logits": c.t_logits}, c.labels)
    with pytest.raises(ValueError, match="teacher_outputs has tensors that require grad"):
        obj(c.student, NS(logits=c.t_logits, hidden_states=tuple(h.requires_grad_() for h in c.t_states)))


def test_feature_ignore_index_must_match():
    from fastkd.features import FeatureDistillation

    with pytest.raises(ValueError, match="feature term 'features' has ignore_index=-1 but the objective has "
                                         "ignore_index=-100"):
        DistillationLoss(features=FeatureDistillation({1: 1}, HS, HT, ignore_index=-1))
    DistillationLoss(features=FeatureDistillation({1: 1}, HS, HT, ignore_index=-1), ignore_index=-1)


def test_gradcheck_relations_float64():
    # The feature and fused logits losses keep one stored gradient and cannot be
    # backpropagated twice, as gradcheck does; their gradients are compared above with
    # autograd through the float64 formulas. The relation terms are plain autograd.
    from fastkd.relations import RelationDistillation

    c = make_case(32)
    obj = DistillationLoss(logits=False, relations={"a": RelationDistillation("rkd_distance"),
                                                    "b": RelationDistillation("rkd_angle")},
                           relation_layers={"a": (1, 2)}, weights={"a": 0.7})
    t_states = tuple(h[:4, :3] for h in c.t_states)
    labels = c.labels[:4, :3]

    def total(s1, s2):
        return obj(NS(hidden_states=(s1 * 0, s1, s2)), NS(hidden_states=t_states), labels)[0]

    inputs = tuple(h[:4, :3].detach().requires_grad_() for h in c.s_states[1:])
    assert torch.autograd.gradcheck(total, inputs)
