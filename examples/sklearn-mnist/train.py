"""Azure ML's sklearn MNIST tutorial script; the one change is the import of Run (cadre for azureml.core)."""

import argparse
import os

import joblib
import numpy as np
from sklearn.linear_model import LogisticRegression
from utils import load_data

from cadre import Run

parser = argparse.ArgumentParser()
parser.add_argument("--data-folder", type=str, dest="data_folder", help="data folder mounting point")
parser.add_argument("--regularization", type=float, dest="reg", default=0.01, help="regularization rate")
args = parser.parse_args()

data_folder = args.data_folder
print("Data folder:", data_folder)

# Pixels scaled into [0, 1]; labels flattened to one value per image.
X_train = load_data(os.path.join(data_folder, "train-images-idx3-ubyte.gz"), False) / 255.0
X_test = load_data(os.path.join(data_folder, "t10k-images-idx3-ubyte.gz"), False) / 255.0
y_train = load_data(os.path.join(data_folder, "train-labels-idx1-ubyte.gz"), True).reshape(-1)
y_test = load_data(os.path.join(data_folder, "t10k-labels-idx1-ubyte.gz"), True).reshape(-1)
print(X_train.shape, y_train.shape, X_test.shape, y_test.shape, sep="\n")

run = Run.get_context()

print("Train a logistic regression model with regularization rate of", args.reg)
clf = LogisticRegression(C=1.0 / args.reg, solver="liblinear", multi_class="auto")
clf.fit(X_train, y_train)

print("Predict the test set")
y_hat = clf.predict(X_test)
acc = np.average(y_hat == y_test)
print("Accuracy is", acc)

run.log("regularization rate", float(args.reg))
run.log("accuracy", float(acc))

os.makedirs("outputs", exist_ok=True)
# Files under ./outputs are stored with the run.
joblib.dump(value=clf, filename="outputs/sklearn_mnist_model.pkl")
