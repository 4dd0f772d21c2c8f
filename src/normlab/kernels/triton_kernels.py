"""placeholder"""
ACT_CODES = {}
def available():
    return False
