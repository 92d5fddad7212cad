"""The image experiment's network and training loop."""
import pytest
import torch

from sparse_tutorial.image_model import ImageConfig, ImageData, ImageNet, accuracy, image_tensors, train_image_model
from sparse_tutorial.layers import DenseFF, SparseFF


def blobs(n=600, seed=0) -> ImageData:
    """Ten separable classes: each class lights up its own patch of a 28x28 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.3 * torch.randn(n, 784, generator=g)
    for c in range(10):
        x[y == c, c * 70:(c + 1) * 70] += 2.0
    return ImageData("blobs", x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:])


@pytest.mark.parametrize("ff,cls", [("dense", DenseFF), ("sparse", SparseFF)])
def test_shapes_and_ff_kind(ff, cls):
    model = ImageNet(ImageConfig(ff=ff))
    assert isinstance(model.ff, cls)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    if ff == "sparse":
        assert model.ff.n_blocks == 40 and model.ff.block_size == 10  # the book's default: 1/10 of 400 active


def test_parameter_count_of_the_dense_network():
    # 784*100+100 + (100*400+400 + 400*100+100) + 100*10+10
    assert ImageNet(ImageConfig()).num_params() == 78500 + 80500 + 1010


@pytest.mark.parametrize("ff", ["dense", "sparse"])
def test_training_learns_a_separable_task(ff):
    data = blobs()
    torch.manual_seed(0)
    model = ImageNet(ImageConfig(ff=ff))
    before = accuracy(model, data.x_test, data.y_test)
    hist = train_image_model(model, data, epochs=3, batch_size=32, progress=False)
    assert list(hist.columns) == ["epoch", "train_loss", "train_acc", "test_acc", "sec_per_epoch"]
    assert len(hist) == 3 and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert hist["test_acc"].iloc[-1] > max(0.7, before + 0.3)


def test_same_seed_same_history():
    data = blobs()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = ImageNet(ImageConfig(ff="sparse"))
        runs.append(train_image_model(model, data, epochs=1, batch_size=64, progress=False))
    assert runs[0]["train_loss"].equals(runs[1]["train_loss"])


@pytest.mark.parametrize("kw,needle", [(dict(ff="moe"), "ff='moe'"), (dict(ff="sparse", block_size=30), "block_size=30"),
                                       (dict(d_model=0), "d_model=0")])
def test_bad_config_is_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ImageConfig(**kw)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="epochs=0"):
        train_image_model(ImageNet(ImageConfig()), blobs(), epochs=0)
    with pytest.raises(ValueError, match="name='cifar'"):
        image_tensors("cifar")


def test_fashion_mnist_tensors(shared_data):
    if not (shared_data / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.skip("no Fashion-MNIST in the offline data folder")
    data = image_tensors("fashion-mnist", train_subset=500, test_subset=200)
    assert data.x_train.shape == (500, 784) and data.x_test.shape == (200, 784)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert set(data.y_train.tolist()) <= set(range(10))
    assert abs(data.x_train.mean().item()) < 0.2  # normalised with the training set's statistics
