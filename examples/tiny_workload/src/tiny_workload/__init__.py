"""An example Consortium workload: softmax regression on 8x8 digits."""
