from alpaca_qlora.bundled.dataset import main

main()
