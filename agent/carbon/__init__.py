"""Grid carbon intensity, PUE and emissions.

``tables`` reads codecarbon's shipped data files, ``intensity`` turns a
configuration into a provider of the intensity in force at a given time,
``emissions`` holds the arithmetic from energy to grams of CO2-equivalent.
"""
