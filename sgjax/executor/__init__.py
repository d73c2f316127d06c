"""The model runner: bucketed ahead-of-time compiled steps, the flat batch they take, on-device sampling."""
