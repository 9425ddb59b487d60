"""`dooly explore`: many simulations over the candidates a store can predict, to find the serving
configuration with the most goodput under an SLO per dollar (candidates, search, hardware, report)."""
