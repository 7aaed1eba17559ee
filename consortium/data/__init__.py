"""Data sets that ship with installed packages, and how to split them across sites."""

# Where a site keeps text datasets: <data dir>/text/<name>.txt (so a README.txt beside
# the .npz files is no dataset).
TEXT_DIR = "text"
