"""Grid carbon intensity, PUE and emissions.

Reference data the other stages read: ``tables`` finds and reads codecarbon's
shipped data files (the one locator: the CPU power model reads its TDP table
through it too), ``intensity`` turns a
configuration into a provider of the intensity in force at a given time,
``emissions`` holds the arithmetic from energy to grams of CO2-equivalent.
"""
