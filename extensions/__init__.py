"""What goes beyond the assignment: one module per feature, each entering a script through one
named hook. See extensions/README.md."""
