import pytest
import torch

import models

EXPECTED_PARAMS = {
    "vgg16": 14_728_266,
    "resnet18": 11_173_962,
    "mobilenetv2": 2_296_922,
    "shufflenetv2": 1_263_854,
    "densenet121": 6_956_298,
}


def test_names_are_the_five_canonical_models():
    assert models.names() == list(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_count_and_output_shape(name):
    model = models.build(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes_changes_the_head():
    with torch.no_grad():
        assert models.build("resnet18", num_classes=100).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("alias, canonical", [("vgg", "vgg16"), ("resnet", "resnet18"), ("mobilenet", "mobilenetv2"),
                                              ("shufflenet", "shufflenetv2"), ("densenet", "densenet121"),
                                              ("ResNet18", "resnet18")])
def test_aliases(alias, canonical):
    assert models.canonical_name(alias) == canonical
    assert type(models.build(alias)) is type(models.build(canonical))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'alexnet'.*resnet18"):
        models.build("alexnet")
