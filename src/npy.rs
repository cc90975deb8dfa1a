//! Reader and writer of NumPy `.npy` files (data sets and outputs).
