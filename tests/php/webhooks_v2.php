<?php
// The amoCRM API v2 webhook snippet as integrations ship it (curl, CURLOPT_POSTFIELDS =>
// http_build_query($data)), pointed at the dispatcher instead of {subdomain}.amocrm.ru.
//
//   php webhooks_v2.php BASE subscribe|unsubscribe URL|- EVENT...
//
// Prints {"code", "content_type", "runtime_timestamp", "response"} as JSON; exits 1 when the
// answer is not 200, 2 when an item has `result: false` (as an integration would throw).
[, $base, $action, $url] = $argv;
$events = array_slice($argv, 4);

$item = ['events' => $events];
if ($url !== '-') {
    $item = ['url' => $url] + $item;
}
$data = [$action => [$item]];
$link = $base . '/api/v2/webhooks/' . $action;

$headers = [];
$curl = curl_init();
curl_setopt($curl, CURLOPT_RETURNTRANSFER, true);
curl_setopt($curl, CURLOPT_USERAGENT, 'amoCRM-API-client/1.0');
curl_setopt($curl, CURLOPT_URL, $link);
curl_setopt($curl, CURLOPT_CUSTOMREQUEST, 'POST');
curl_setopt($curl, CURLOPT_POSTFIELDS, http_build_query($data));
curl_setopt($curl, CURLOPT_HEADER, false);
curl_setopt($curl, CURLOPT_HEADERFUNCTION, function ($curl, $line) use (&$headers) {
    $parts = explode(':', $line, 2);
    if (count($parts) === 2) {
        $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
    }
    return strlen($line);
});
$out = curl_exec($curl);
if ($out === false) {
    fwrite(STDERR, 'curl: ' . curl_error($curl) . PHP_EOL);
    exit(1);
}
$code = (int) curl_getinfo($curl, CURLINFO_HTTP_CODE);
curl_close($curl);

$response = json_decode($out, true);
echo json_encode([
    'code' => $code,
    'content_type' => $headers['content-type'] ?? null,
    'runtime_timestamp' => $headers['runtime-timestamp'] ?? null,
    'response' => $response,
], JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES), PHP_EOL;

if ($code !== 200) {
    exit(1);
}
foreach ($response['_embedded']['items'] as $result) {
    if (!$result['result']) {
        exit(2);
    }
}
