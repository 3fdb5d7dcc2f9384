-- Count one batch of firings in its minute's statistics (delayq/firing_stats.py): sent in
-- the same round trip as the batch's ack. The hash expires on its own once it is too old
-- for the chart. KEYS: the minute's hash. ARGV: keep ms, then per field its increment.
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
