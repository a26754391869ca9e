from alpaca_qlora.data.bundled.dataset import main

main()
